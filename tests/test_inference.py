"""After training: `evaluate` agrees exactly with the run's metrics.json (1 and 2 processes), `predict` reads
image files of any mode and size and reproduces the run's accuracy from PNGs of its test set, `export` gives
the same predictions as the checkpoint it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_alexnet.checkpoint import list_checkpoints
from dist_alexnet.datasets import CLASS_NAMES
from dist_alexnet.serving import read_image
from tests.helpers import metrics, run, tiny_split, train_tiny


def final_checkpoint(run_dir: Path) -> Path:
    return list_checkpoints(run_dir)[-1]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_evaluate_equals_the_runs_final_metrics(processes, trained_run, data_dir, tmp_path):
    run_dir = trained_run
    if processes == 2:  # trained and evaluated by two processes
        run_dir = tmp_path / "run"
        train_tiny(run_dir, data_dir, "--epochs", "1", processes=2)
    result = run(["--checkpoint", str(final_checkpoint(run_dir)), "--json"], processes=processes,
                 subcommand="evaluate")
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    final = metrics(run_dir)
    for key in ("test_acc", "test_loss", "test_correct", "test_samples"):
        assert evaluated[key] == final[key], key
    assert evaluated["world_size"] == processes
    confusion = np.array(evaluated["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == final["test_samples"]
    assert np.trace(confusion) == final["test_correct"]
    assert list(evaluated["per_class_acc"]) == list(CLASS_NAMES)

    table = run(["--checkpoint", str(run_dir)], subcommand="evaluate").stdout  # a run dir: its best checkpoint
    assert "confusion matrix" in table and "Ankle boot" in table and "accuracy" in table


def test_evaluate_the_train_split_counts_every_training_sample(trained_run):
    run_dir = trained_run
    result = run(["--checkpoint", str(final_checkpoint(run_dir)), "--split", "train", "--limit-train", "300",
                  "--json"], subcommand="evaluate")
    evaluated = json.loads(result.stdout)
    assert evaluated["split"] == "train" and evaluated["test_samples"] == 300


def test_predict_reproduces_the_runs_accuracy_from_png_files(trained_run, data_dir, tmp_path):
    run_dir = trained_run
    test = tiny_split(data_dir)
    images, labels = test.images, test.labels
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:04d}.png")
    result = run(["--checkpoint", str(final_checkpoint(run_dir)), "--json", "--batch-size", "32", str(folder)],
                 subcommand="predict")
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions) == len(labels)
    correct = sum(p["class_index"] == int(label) for p, label in zip(predictions, labels))
    assert correct == metrics(run_dir)["test_correct"]

    # The export predicts exactly what its checkpoint predicts, and evaluates the same.
    export_dir = tmp_path / "export"
    run(["--checkpoint", str(final_checkpoint(run_dir)), "--out", str(export_dir)], subcommand="export")
    card = json.loads((export_dir / "config.json").read_text())
    assert card["class_names"] == list(CLASS_NAMES) and card["image_size"] == 64
    assert card["width"] == 0.125 and card["metrics"]["test_acc"] == metrics(run_dir)["test_acc"]
    assert sorted(p.name for p in export_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    exported = run(["--checkpoint", str(export_dir), "--json", "--batch-size", "32", str(folder)],
                   subcommand="predict")
    assert json.loads(exported.stdout)["predictions"] == predictions
    evaluated = json.loads(run(["--checkpoint", str(export_dir), "--json"], subcommand="evaluate").stdout)
    assert evaluated["test_acc"] == metrics(run_dir)["test_acc"]


def test_predict_reads_png_and_jpeg_in_any_mode_and_size(trained_run, data_dir, tmp_path):
    run_dir = trained_run
    item = tiny_split(data_dir).images[0].numpy()
    files = write_variants(item, tmp_path)
    result = run(["--checkpoint", str(run_dir), "--json", "--top-k", "2", *map(str, files)], subcommand="predict")
    out = json.loads(result.stdout)
    assert out["errors"] == [] and len(out["predictions"]) == len(files)
    by_name = {Path(p["file"]).name: p for p in out["predictions"]}
    for p in out["predictions"]:
        assert p["class"] in CLASS_NAMES and CLASS_NAMES[p["class_index"]] == p["class"]
        assert sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
    # Lossless files of the same 28x28 picture are the same input, whatever their mode.
    for name in ("rgb.png", "rgba.png", "gray16.png", "palette.png", "gray-alpha.png"):
        assert by_name[name]["probabilities"] == by_name["gray.png"]["probabilities"], name

    lines = run(["--checkpoint", str(run_dir), str(files[0])], subcommand="predict").stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{files[0]}: ")


def write_variants(item: np.ndarray, folder: Path) -> list[Path]:
    """One 28x28 item saved as PNG and JPEG files of several modes and sizes."""
    gray = Image.fromarray(item, mode="L")
    variants = {
        "gray.png": gray,
        "rgb.png": gray.convert("RGB"),
        "rgba.png": gray.convert("RGBA"),
        "gray-alpha.png": gray.convert("LA"),
        "palette.png": gray.convert("P"),
        "gray16.png": Image.fromarray(item.astype(np.uint16) * 257),
        "big-rgb.jpg": gray.convert("RGB").resize((300, 200)),
        "small.jpg": gray.resize((17, 40)),
        "bilevel.png": gray.convert("1"),
    }
    paths = []
    for name, image in variants.items():
        image.save(folder / name)
        paths.append(folder / name)
    assert Image.open(folder / "gray16.png").mode.startswith("I")  # really a 16-bit file
    return paths


def test_read_image_matches_fashion_mnist_polarity(tmp_path):
    # A dark square on a white, partly transparent photo: --invert makes it a light object on black.
    picture = np.full((56, 84, 4), 255, dtype=np.uint8)
    picture[14:42, 28:56, :3] = 0
    Image.fromarray(picture, mode="RGBA").save(tmp_path / "photo.png")
    plain, inverted = read_image(tmp_path / "photo.png"), read_image(tmp_path / "photo.png", invert=True)
    assert plain.shape == inverted.shape == (28, 28)
    # fitted into 28x28 with the aspect ratio kept: 84x56 -> 28x19, centred, the rest black
    assert inverted[:4].max() == 0 and inverted[-4:].max() == 0
    assert inverted[14, 14] == 255 and inverted[7, 2] == 0
    assert plain[14, 14] == 0 and plain[7, 2] == 255 and plain[0, 14] == 0
    Image.fromarray(np.zeros((30, 30, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "clear.png")
    for invert in (False, True):
        assert read_image(tmp_path / "clear.png", invert=invert).max() == 0  # transparent = background


def test_synthetic_idx_round_trips_through_png(data_dir, tmp_path):
    images = tiny_split(data_dir).images
    Image.fromarray(images[3].numpy(), mode="L").save(tmp_path / "item.png")
    assert (read_image(tmp_path / "item.png") == images[3].numpy()).all()


@pytest.mark.slow
def test_a_closed_stdout_ends_quietly_and_a_full_one_is_one_line(trained_run, data_dir, tmp_path):
    """`predict ... | head`: the reader goes away, the command ends quietly with a shell's SIGPIPE status; output
    into a full disk (/dev/full) is one line naming it, exit 2 (one error boundary serves every subcommand)."""
    import os
    import subprocess

    from tests.helpers import REPO, command, cpu_env

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(tiny_split(data_dir).images[:40]):
        Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:04d}.png")
    checkpoint = str(final_checkpoint(trained_run))
    predict = command(["--checkpoint", checkpoint, "--batch-size", "8", str(folder)], subcommand="predict")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is already gone when the first prediction is written
    closed = subprocess.run(predict, stdout=write_end, stderr=subprocess.PIPE, text=True, env=cpu_env(), cwd=REPO,
                            timeout=120)
    os.close(write_end)
    assert closed.returncode == 141 and closed.stderr == "", closed.stderr
    with open("/dev/full", "w") as full:
        result = subprocess.run(command(["--checkpoint", checkpoint, "--json"], subcommand="evaluate"), stdout=full,
                                stderr=subprocess.PIPE, text=True, env=cpu_env(), cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("dist-alexnet: error: ") and "No space left on device" in line, line


def test_a_photo_is_read_upright_as_its_exif_orientation_says(data_dir, tmp_path):
    """A phone stores a portrait photo sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view):
    predict reads the picture a viewer shows."""
    upright = Image.fromarray(tiny_split(data_dir).images[3].numpy(), mode="L").resize((40, 60))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    assert (read_image(tmp_path / "sideways.png") == read_image(tmp_path / "upright.png")).all()
