"""Every wrong input a user or a cluster can hand the program gets one clear line (what is wrong and how to
fix it), exit code 2 and no traceback, from the command line's entry point, main(argv), run in this
process (Accelerate's state reset after each). Multi-process cases (missing data, a NaN on one rank) and
a full disk are in test_guards.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_alexnet.checkpoint import list_checkpoints
from tests.helpers import (TINY, TRAIN_SAMPLES, corrupt_count, corrupt_label, corrupt_magic, corrupt_shape,
                           corrupt_truncate, cpu_env, run, tiny_args, tiny_raw_dir, truncate)

CASES = {}


def case(function):
    """A bad input: function(tmp_path, data_dir, run_dir) -> (argv, word the message must contain[, env])."""
    CASES[function.__name__] = function
    return function


def tiny(data_dir, tmp, *extra):
    return ["train", *tiny_args(data_dir, tmp / "out", *extra)]


def real_layout_copy(data_dir, tmp, corrupt):
    """The tiny synthetic set as Fashion-MNIST files under tmp/data (the real data set's code path), with one
    file broken by `corrupt`; returns the command line and the words the message must contain."""
    raw = tmp / "data" / "FashionMNIST" / "raw"
    shutil.copytree(tiny_raw_dir(data_dir), raw)
    _, words = corrupt(raw)
    return ["train", *TINY, "--dataset", "fashion-mnist", "--no-download", "--data-dir", str(tmp / "data"),
            "--output-dir", str(tmp / "out")], words


# --- data

@case
def data_missing_without_download(tmp, data_dir, run_dir):
    return ["train", "--data-dir", str(tmp / "empty"), "--no-download", "--output-dir", str(tmp / "out")], \
        "--dataset synthetic"


@case
def download_impossible_offline(tmp, data_dir, run_dir):
    # Every connection goes to a closed local port: offline, deterministically and at once.
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    return ["train", "--data-dir", str(tmp / "empty"), "--output-dir", str(tmp / "out")], \
        "could not download Fashion-MNIST", offline


# One file of the data set broken (the real data set's code path): case name -> how it is broken.
IDX_CASES = {"idx_truncated": corrupt_truncate, "idx_wrong_magic": corrupt_magic, "idx_wrong_shape": corrupt_shape,
             "idx_count_mismatch": corrupt_count, "idx_label_outside_0_to_9": corrupt_label}
for name, corrupt in IDX_CASES.items():
    CASES[name] = lambda tmp, data_dir, run_dir, corrupt=corrupt: real_layout_copy(data_dir, tmp, corrupt)


# --- configuration

# A bad config file: case name -> (its text, words of the message).
YAML_CASES = {
    "yaml_unknown_key": ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    "yaml_wrong_type": ("epochs: three\n", "epochs must be int"),
    "yaml_not_a_mapping": ("- lr\n- 0.1\n", "must hold a mapping"),
    "yaml_invalid": ("lr: [0.1\n", "is not valid YAML"),
    "yaml_empty_epochs": ("epochs: ~\n", "epochs must be int, got an empty value"),
    "yaml_empty_data_dir": ("data_dir:\n", "data_dir must be str, got an empty value"),
}
for name, (text, words) in YAML_CASES.items():
    def yaml_case(tmp, data_dir, run_dir, text=text, words=words):
        (tmp / "c.yaml").write_text(text)
        return tiny(data_dir, tmp, "--config", str(tmp / "c.yaml")), words
    CASES[name] = yaml_case

# A bad option on the tiny run's command line: case name -> (the option and its value, words of the message).
OPTION_CASES = {
    "out_of_range_learning_rate": (["--lr", "-1"], "--lr must be a positive finite number"),
    "out_of_range_epochs": (["--epochs", "0"], "--epochs must be >= 1"),
    "fp16_without_cuda": (["--mixed-precision", "fp16"], "fp16 needs a CUDA GPU"),  # cpu_env() hides any GPU
    "keep_one_checkpoint": (["--keep-checkpoints", "1"], "--keep-checkpoints must be >= 2"),
    "batch_larger_than_data_set": (["--batch-size", "5000"], f"larger than the {TRAIN_SAMPLES} training samples"),
    "image_size_below_64": (["--image-size", "32"], "--image-size must be >= 64"),
    "negative_weight_decay": (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    "warmup_longer_than_the_run": (["--epochs", "2", "--warmup-epochs", "3"], "shorter than the run's --epochs 2"),
    "warmup_steps_longer_than_the_run": (["--epochs", "1", "--warmup-steps", "40"], "as long as the whole run"),
    "momentum_without_sgd": (["--momentum", "0.9"], "--momentum is for --optimizer sgd"),
    "min_lr_without_a_schedule": (["--min-lr", "1e-5"], "--min-lr is where a cosine or onecycle schedule ends"),
    "label_smoothing_of_one": (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    "dropout_of_one": (["--dropout", "1"], "--dropout must be in [0, 1)"),
    "ema_decay_of_one": (["--ema-decay", "1"], "--ema-decay must be in (0, 1)"),
    "grad_clip_of_zero": (["--grad-clip", "0"], "--grad-clip must be a positive number"),
    "negative_seed": (["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
    "seed_too_big": (["--seed", str(2**32)], "--seed must be in 0 .. 2**32 - 1"),
    "image_size_above_1024": (["--image-size", "10000"], "--image-size must be <= 1024"),
    "collective_timeout_of_zero": (["--collective-timeout", "0"], "--collective-timeout must be a positive number"),
    "checkpoint_minutes_of_zero": (["--checkpoint-minutes", "0"], "--checkpoint-minutes must be positive"),
}
for name, (option, words) in OPTION_CASES.items():
    CASES[name] = lambda tmp, data_dir, run_dir, option=option, words=words: (tiny(data_dir, tmp, *option), words)


@case
def global_batch_that_does_not_divide(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--global-batch-size", "32", "--grad-accum", "3"), \
        "does not divide by 1 process(es) x --grad-accum 3"


@case
def both_batch_options(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--batch-size", "16", "--global-batch-size", "64"), \
        "--global-batch-size (all processes together), not both"


@case
def yaml_not_utf8(tmp, data_dir, run_dir):
    (tmp / "c.yaml").write_bytes(b"lr: \xff\xfe\n")
    return tiny(data_dir, tmp, "--config", str(tmp / "c.yaml")), "is not UTF-8 text"


@case
def config_is_a_directory(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--config", str(tmp)), "is a directory; give a YAML file"


# A run directory whose own subdirectory is not one: case name -> (the entry, a file or a link to itself).
ENTRY_CASES = {"tensorboard_is_a_file": ("tensorboard", "file"), "checkpoints_is_a_file": ("checkpoints", "file"),
               "checkpoints_is_a_link_loop": ("checkpoints", "link")}
for name, (entry, kind) in ENTRY_CASES.items():
    def entry_case(tmp, data_dir, run_dir, entry=entry, kind=kind):
        (tmp / "out").mkdir()
        if kind == "file":
            (tmp / "out" / entry).write_text("")
        else:
            (tmp / "out" / entry).symlink_to(entry)
        words = "a file, not a directory" if kind == "file" else "a link to nowhere or to itself"
        return tiny(data_dir, tmp), f"{entry} is {words}"
    CASES[name] = entry_case


@case
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
    truncate(copy / "model.safetensors")
    return ["evaluate", "--checkpoint", str(copy)], "truncated or corrupt"


@case
def checkpoint_of_another_architecture(tmp, data_dir, run_dir):
    copy = shutil.copytree(list_checkpoints(run_dir)[-1], tmp / "ckpt")
    weights = load_file(copy / "model.safetensors")
    weights["classifier.7.weight"] = torch.zeros(1000, weights["classifier.7.weight"].shape[1])  # 1000 classes
    save_file(weights, copy / "model.safetensors")
    return ["predict", "--checkpoint", str(copy), str(tmp)], "another architecture"


@case
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


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line_and_exit_code_2(name, tmp_path, data_dir, trained_run):
    argv, word, *env = CASES[name](tmp_path, data_dir, trained_run)
    result = run(argv[1:], subcommand=argv[0], check=False, env=cpu_env(**(env[0] if env else {})))
    errors = [line for line in result.stderr.splitlines() if line.startswith("dist-alexnet: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and word in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if name == "predict_non_image_file":  # the other files still get their predictions
        assert result.stdout.startswith(f"{tmp_path / 'good.png'}: ")


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_debug_shows_the_traceback(tmp_path):
    """--debug, in a real process: the traceback Python prints for an uncaught error."""
    result = run(["--checkpoint", str(tmp_path / "nowhere"), "--debug"], subcommand="evaluate", check=False,
                 timeout=120, in_process=False)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr
