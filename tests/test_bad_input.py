"""Every wrong input a user or a cluster can hand the program gets one clear line (what is wrong and how to
fix it), exit code 2 and no traceback, from the command line's entry point, main(argv), run in this
process (Accelerate's state reset after each). Multi-process cases (missing data, a NaN on one rank) and
a full disk are in test_guards.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


def corrupt_empty_test_set(raw: Path):
    """A valid header that announces 0 images (and 0 labels)."""
    from dist_alexnet.datasets import write_idx

    write_idx(raw / "t10k-images-idx3-ubyte", torch.zeros(0, 28, 28, dtype=torch.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.zeros(0, dtype=torch.uint8))
    return raw / "t10k-images-idx3-ubyte", "holds no samples"


CASES["idx_no_samples"] = lambda tmp, data_dir, run_dir: real_layout_copy(data_dir, tmp, corrupt_empty_test_set)


@case
def synthetic_set_larger_than_memory(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--synthetic-train-size", "100000000000"), "more than half of this machine's"


# --- configuration

# A bad config file: case name -> (its text, words of the message).
YAML_CASES = {
    "yaml_unknown_key": ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    "yaml_wrong_type": ("epochs: three\n", "epochs must be int"),
    "yaml_not_a_mapping": ("- lr\n- 0.1\n", "must hold a mapping"),
    "yaml_invalid": ("lr: [0.1\n", "is not valid YAML"),
    "yaml_empty_epochs": ("epochs: ~\n", "epochs must be int, got an empty value"),
    "yaml_empty_data_dir": ("data_dir:\n", "data_dir must be str, got an empty value"),
    "yaml_key_twice": ("epochs: 2\nlr: 0.01\nepochs: 3\n", "key 'epochs' is given twice (again on line 3)"),
    "yaml_option_spelled_both_ways": ("image_size: 64\nimage-size: 96\n",
                                      "'image_size' and 'image-size' are the same option"),
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
    "collective_timeout_past_the_backends_limit": (["--collective-timeout", "1e15"],
                                                   "--collective-timeout must be at most 1e+09 s"),
    "collective_timeout_that_overflows_nanoseconds": (["--collective-timeout", "1e10"],
                                                      "--collective-timeout must be at most 1e+09 s"),
    "report_to_none_and_a_tracker": (["--report-to", "none,tensorboard"], "all and none stand alone"),
    "report_to_all_and_none": (["--report-to", "all,none"], "all and none stand alone"),
    "profile_window_past_max_steps": (["--max-steps", "4", "--profile-steps", "3:9"],
                                      "--profile-steps 3:9 ends after the run's last step (--max-steps 4)"),
    # 32 samples per step, 32 steps per epoch: the run ends at step 32 (known only once the data is loaded)
    "profile_window_past_the_last_epoch": (["--epochs", "1", "--profile-steps", "30:40"],
                                           "--profile-steps 30:40 ends after the run's last step, 32"),
}
for name, (option, words) in OPTION_CASES.items():
    CASES[name] = lambda tmp, data_dir, run_dir, option=option, words=words: (tiny(data_dir, tmp, *option), words)


@case
def global_batch_that_does_not_divide(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--global-batch-size", "32", "--grad-accum", "3"), \
        "does not divide by 1 process(es) x --grad-accum 3"


@case
def global_batch_that_fits_no_process_count(tmp, data_dir, run_dir):
    return tiny(data_dir, tmp, "--global-batch-size", "33", "--grad-accum", "2"), \
        "(with --grad-accum 2 it fits no number of processes)"


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
def run_config_yaml_is_a_directory(tmp, data_dir, run_dir):
    (tmp / "out" / "config.yaml").mkdir(parents=True)
    return tiny(data_dir, tmp), f"cannot write {tmp / 'out' / 'config.yaml'} (Is a directory)"


@case
def report_that_cannot_be_written(tmp, data_dir, run_dir):
    copy = shutil.copytree(run_dir, tmp / "run")
    (copy / "loss.png").unlink()
    (copy / "loss.png").mkdir()  # a file the report must write, blocked (as root, permissions would not block it)
    return ["report", str(copy)], f"cannot write the report into {copy}: {copy / 'loss.png'} (Is a directory)"


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


def tampered_checkpoint(tmp, run_dir, **fields):
    copy = shutil.copytree(list_checkpoints(run_dir)[-1], tmp / "ckpt" / "checkpoints" / "step_000064")
    state = json.loads((copy / "trainer_state.json").read_text())
    (copy / "trainer_state.json").write_text(json.dumps({**state, **fields}))
    return copy


# A trainer_state.json that is valid JSON with a field out of range: case name -> (the field, words of the message).
TAMPERED_CASES = {
    "trainer_state_negative_applied_steps": ({"applied_steps": -5}, "applied_steps is -5, not a whole number from 0"),
    "trainer_state_position_past_the_epoch": ({"position": 10**9},
                                              f"position {10**9} is past the end of an epoch of {TRAIN_SAMPLES}"),
    "trainer_state_accuracy_above_one": ({"best_test_acc": 7.5}, "best_test_acc is 7.5, not an accuracy"),
    "trainer_state_nan_pending_sums": ({"pending_train_sums": [1, "x", 2]}, "pending_train_sums is [1, 'x', 2]"),
    "trainer_state_no_processes": ({"world_size": 0}, "world_size is 0"),
}
for name, (fields, words) in TAMPERED_CASES.items():
    def tampered_case(tmp, data_dir, run_dir, fields=fields, words=words):
        copy = tampered_checkpoint(tmp, run_dir, **fields)
        return tiny(data_dir, tmp, "--epochs", "3", "--resume", str(copy)), \
            f"{copy / 'trainer_state.json'}: {words}"
    CASES[name] = tampered_case


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


@case
def predict_broken_link_in_a_directory(tmp, data_dir, run_dir):
    (tmp / "images").mkdir()
    (tmp / "images" / "shirt.png").symlink_to(tmp / "gone.png")
    return ["predict", "--checkpoint", str(run_dir), str(tmp / "images")], \
        f"{tmp / 'images' / 'shirt.png'} is a link to nowhere"


@case
def predict_fifo_in_a_directory(tmp, data_dir, run_dir):  # never opened: reading it would wait forever
    (tmp / "images").mkdir()
    os.mkfifo(tmp / "images" / "camera.png")
    return ["predict", "--checkpoint", str(run_dir), str(tmp / "images")], \
        f"{tmp / 'images' / 'camera.png'} is not a regular file"


def onnx_folder(tmp, input_name="images", dtype="uint8", classes=10):
    """A folder as `export --format onnx` writes it, with a one-layer graph of the given signature."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    from dist_alexnet.datasets import CLASS_NAMES

    kind = {"uint8": TensorProto.UINT8, "float": TensorProto.FLOAT}[dtype]
    nodes = [helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["as_float", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weight"], ["logits"])]
    constants = [numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "shape"),
                 numpy_helper.from_array(np.zeros((784, classes), dtype=np.float32), "weight")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(input_name, kind, ["batch", 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              constants)
    folder = tmp / "export"
    folder.mkdir()
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps({"class_names": list(CLASS_NAMES)}))
    from PIL import Image
    Image.new("L", (28, 28)).save(tmp / "item.png")
    return ["predict", "--onnx", "--checkpoint", str(folder), str(tmp / "item.png")]


# An ONNX graph that is not an export's: case name -> (its signature, words of the message).
ONNX_CASES = {
    "onnx_wrong_input_name": ({"input_name": "pixels"}, "takes pixels tensor(uint8)"),
    "onnx_wrong_input_dtype": ({"dtype": "float"}, "takes images tensor(float)"),
    "onnx_28_outputs_for_10_classes": ({"classes": 28}, "gives logits ['batch', 28], not one output of [batch, 10]"),
}
for name, (signature, words) in ONNX_CASES.items():
    CASES[name] = lambda tmp, data_dir, run_dir, signature=signature, words=words: (onnx_folder(tmp, **signature),
                                                                                    words)


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


@pytest.mark.parametrize("variables, words", [
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' is not a whole number"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 must be below WORLD_SIZE=2"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
])
def test_a_launcher_environment_that_cannot_be_used_is_one_line(tmp_path, data_dir, variables, words):
    result = run(tiny_args(data_dir, tmp_path / "run", "--max-steps", "1"), env=cpu_env(**variables), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert words in result.stderr and "unset WORLD_SIZE" in result.stderr


def test_the_official_gz_files_are_read_as_they_are_downloaded(tmp_path, data_dir):
    """raw/ holding the official *-ubyte.gz files, not extracted: read as they are."""
    import gzip

    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for file in tiny_raw_dir(data_dir).iterdir():
        (raw / f"{file.name}.gz").write_bytes(gzip.compress(file.read_bytes()))
    result = run([*TINY, "--dataset", "fashion-mnist", "--no-download", "--data-dir", str(tmp_path / "data"),
                  "--max-steps", "1", "--output-dir", str(tmp_path / "out")])
    assert f"{TRAIN_SAMPLES} train / 101 test samples" in result.stdout
