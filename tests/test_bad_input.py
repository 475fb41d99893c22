"""Every wrong input a user or a cluster can hand the program gets one clear line (what is wrong and how to
fix it), exit code 2 and no traceback, from the command line's entry point (in a fresh process for the
cases that get as far as starting Accelerate). Multi-process cases (missing data, a NaN
on one rank) and a full disk are in test_guards.py."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_alexnet.checkpoint import list_checkpoints
from dist_alexnet.cli import main
from dist_alexnet.data import SYNTHETIC_SEED, synthetic_root, write_idx
from tests.helpers import TINY, cpu_env, run, train_tiny
from tests.test_data import corrupt_magic, corrupt_truncate

CASES = {}
OWN_PROCESS = set()  # cases that get as far as starting Accelerate: each runs in a fresh process


def case(function=None, *, own_process=False):
    """A bad input: function(tmp_path, data_dir, run_dir) -> (argv, word the message must contain[, env])."""
    def register(function):
        CASES[function.__name__] = function
        if own_process:
            OWN_PROCESS.add(function.__name__)
        return function
    return register(function) if function else register


def tiny(data_dir, tmp, *extra):
    return ["train", *TINY, "--data-dir", str(data_dir), "--output-dir", str(tmp / "out"), *extra]


def real_layout_copy(data_dir, tmp, corrupt=None):
    """The tiny synthetic set as Fashion-MNIST files under tmp/data (the real data set's code path)."""
    raw = tmp / "data" / "FashionMNIST" / "raw"
    shutil.copytree(synthetic_root(data_dir, 1024, 101, SYNTHETIC_SEED) / "FashionMNIST" / "raw", raw)
    if corrupt:
        corrupt(raw)
    return ["train", *TINY, "--dataset", "fashion-mnist", "--no-download", "--data-dir", str(tmp / "data"),
            "--output-dir", str(tmp / "out")]


# --- data

@case(own_process=True)
def data_missing_without_download(tmp, data_dir, run_dir):
    return ["train", "--data-dir", str(tmp / "empty"), "--no-download", "--output-dir", str(tmp / "out")], \
        "--dataset synthetic"


@case(own_process=True)
def download_impossible_offline(tmp, data_dir, run_dir):
    # Every connection goes to a closed local port: offline, deterministically and at once.
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    return ["train", "--data-dir", str(tmp / "empty"), "--output-dir", str(tmp / "out")], \
        "could not download Fashion-MNIST", offline


@case(own_process=True)
def idx_truncated(tmp, data_dir, run_dir):
    return real_layout_copy(data_dir, tmp, corrupt_truncate), "truncated"


@case(own_process=True)
def idx_wrong_magic(tmp, data_dir, run_dir):
    return real_layout_copy(data_dir, tmp, corrupt_magic), "bad magic number"


@case(own_process=True)
def idx_wrong_shape(tmp, data_dir, run_dir):
    def images_32x32(raw):
        write_idx(raw / "train-images-idx3-ubyte", torch.zeros(1024, 32, 32, dtype=torch.uint8))
    return real_layout_copy(data_dir, tmp, images_32x32), "Fashion-MNIST's are 28x28"


@case(own_process=True)
def idx_count_mismatch(tmp, data_dir, run_dir):
    def fewer_labels(raw):
        write_idx(raw / "train-labels-idx1-ubyte", torch.zeros(1000, dtype=torch.uint8))
    return real_layout_copy(data_dir, tmp, fewer_labels), "1000 labels for 1024 images"


@case(own_process=True)
def idx_label_outside_0_to_9(tmp, data_dir, run_dir):
    def label_10(raw):
        write_idx(raw / "train-labels-idx1-ubyte", torch.tensor([3] * 1023 + [10], dtype=torch.uint8))
    return real_layout_copy(data_dir, tmp, label_10), "outside 0..9"


# --- configuration

@case
def yaml_unknown_key(tmp, data_dir, run_dir):
    (tmp / "c.yaml").write_text("learning_rate: 0.1\n")
    return tiny(data_dir, tmp, "--config", str(tmp / "c.yaml")), "unknown key 'learning_rate'"


@case
def yaml_wrong_type(tmp, data_dir, run_dir):
    (tmp / "c.yaml").write_text("epochs: three\n")
    return tiny(data_dir, tmp, "--config", str(tmp / "c.yaml")), "epochs must be int"


@case
def yaml_not_a_mapping(tmp, data_dir, run_dir):
    (tmp / "c.yaml").write_text("- lr\n- 0.1\n")
    return tiny(data_dir, tmp, "--config", str(tmp / "c.yaml")), "must hold a mapping"


@case
def yaml_invalid(tmp, data_dir, run_dir):
    (tmp / "c.yaml").write_text("lr: [0.1\n")
    return tiny(data_dir, tmp, "--config", str(tmp / "c.yaml")), "is not valid YAML"


@case
def out_of_range_learning_rate(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--lr", "-1"), "--lr must be a positive finite number"


@case
def out_of_range_epochs(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--epochs", "0"), "--epochs must be >= 1"


@case
def fp16_without_cuda(tmp, data_dir, run_dir):  # cpu_env() hides any GPU (ACCELERATE_USE_CPU=1)
    return tiny(data_dir, tmp, "--mixed-precision", "fp16"), "fp16 needs a CUDA GPU"


@case
def keep_one_checkpoint(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--keep-checkpoints", "1"), "--keep-checkpoints must be >= 2"


@case(own_process=True)
def batch_larger_than_data_set(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--batch-size", "5000"), "larger than the 1024 training samples"


@case
def image_size_below_64(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--image-size", "32"), "--image-size must be >= 64"


@case(own_process=True)
def output_dir_not_writable(tmp, data_dir, run_dir):
    (tmp / "a-file").write_text("")
    return ["train", *TINY, "--data-dir", str(data_dir), "--output-dir", str(tmp / "a-file" / "run")], \
        "not writable"


# --- checkpoints

@case
def checkpoint_missing(tmp, data_dir, run_dir):
    return ["evaluate", "--checkpoint", str(tmp / "nowhere")], "does not exist"


@case
def checkpoint_wrong_format(tmp, data_dir, run_dir):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "model.txt").write_text("not a model")
    return ["evaluate", "--checkpoint", str(tmp / "notes")], "is not a dist-alexnet checkpoint"


@case
def checkpoint_truncated(tmp, data_dir, run_dir):
    copy = shutil.copytree(list_checkpoints(run_dir)[-1], tmp / "ckpt")
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["evaluate", "--checkpoint", str(copy)], "truncated or corrupt"


@case
def checkpoint_of_another_architecture(tmp, data_dir, run_dir):
    copy = shutil.copytree(list_checkpoints(run_dir)[-1], tmp / "ckpt")
    weights = load_file(copy / "model.safetensors")
    weights["classifier.7.weight"] = torch.zeros(1000, weights["classifier.7.weight"].shape[1])  # 1000 classes
    save_file(weights, copy / "model.safetensors")
    return ["predict", "--checkpoint", str(copy), str(tmp)], "another architecture"


@case(own_process=True)
def resume_from_another_model(tmp, data_dir, run_dir):
    return ["train", *TINY, "--data-dir", str(data_dir), "--output-dir", str(tmp / "out"), "--model-width", "0.25",
            "--resume", str(list_checkpoints(run_dir)[-1])], "different model or data set"


@case
def export_into_a_file(tmp, data_dir, run_dir):
    (tmp / "a-file").write_text("")
    return ["export", "--checkpoint", str(run_dir), "--out", str(tmp / "a-file" / "export")], "cannot write"


# --- predict

@case
def predict_non_image_file(tmp, data_dir, run_dir):
    (tmp / "notes.png").write_text("not a picture")
    from PIL import Image
    Image.new("L", (28, 28)).save(tmp / "good.png")
    return ["predict", "--checkpoint", str(run_dir), str(tmp / "notes.png"), str(tmp / "good.png")], \
        "cannot read it as an image"


@case
def predict_empty_directory(tmp, data_dir, run_dir):
    (tmp / "empty").mkdir()
    return ["predict", "--checkpoint", str(run_dir), str(tmp / "empty")], "holds no image files"


@case
def predict_missing_file(tmp, data_dir, run_dir):
    return ["predict", "--checkpoint", str(run_dir), str(tmp / "nope.png")], "does not exist"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    """A tiny trained run whose checkpoints the checkpoint cases copy and break."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_tiny(run_dir, data_dir, "--epochs", "1")
    return run_dir


@pytest.fixture(scope="module")
def processes(tmp_path_factory, data_dir, run_dir) -> dict:
    """The OWN_PROCESS cases run as real commands, two at a time (each spends seconds importing torch)."""
    def attempt(name):
        tmp = tmp_path_factory.mktemp(name)
        argv, word, *env = CASES[name](tmp, data_dir, run_dir)
        result = run(argv[1:], subcommand=argv[0], check=False, timeout=120, env=cpu_env(**(env[0] if env else {})))
        return tmp, word, result.returncode, result.stdout, result.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(sorted(OWN_PROCESS), pool.map(attempt, sorted(OWN_PROCESS))))


def in_this_process(name, tmp_path, data_dir, run_dir, capsys, monkeypatch):
    """The command line's entry point, main(argv), called here: the same code path without a process start."""
    for key, value in cpu_env().items():
        monkeypatch.setenv(key, value)
    argv, word = CASES[name](tmp_path, data_dir, run_dir)
    code = main(argv)
    out = capsys.readouterr()
    return tmp_path, word, code, out.out, out.err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line_and_exit_code_2(name, request, tmp_path, data_dir, run_dir, capsys,
                                                       monkeypatch):
    if name in OWN_PROCESS:
        tmp, word, code, stdout, stderr = request.getfixturevalue("processes")[name]
    else:
        tmp, word, code, stdout, stderr = in_this_process(name, tmp_path, data_dir, run_dir, capsys, monkeypatch)
    errors = [line for line in stderr.splitlines() if line.startswith("dist-alexnet: error:")]
    assert code == 2, stderr[-3000:]
    assert len(errors) == 1 and word in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    if name == "predict_non_image_file":  # the other files still get their predictions
        assert stdout.startswith(f"{tmp / 'good.png'}: ")


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_debug_shows_the_traceback(tmp_path, data_dir):
    result = run(["--checkpoint", str(tmp_path / "nowhere"), "--debug"], subcommand="evaluate", check=False,
                 timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr
