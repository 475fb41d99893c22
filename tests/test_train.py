"""End to end in one process: the run directory's contents, learning, bf16 on CPU."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from dist_alexnet.model import AlexNet
from tests.helpers import TEST_SAMPLES, metrics, scalars, steps_per_epoch, train_tiny


@pytest.mark.floor
def test_single_process_run_leaves_a_complete_run_directory(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, data_dir, "--epochs", "3")

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["epochs"] == 3 and config["model_width"] == 0.125 and config["dataset"] == "synthetic"

    m = metrics(run_dir)
    assert m["steps"] == 3 * steps_per_epoch() and m["epochs"] == 3
    assert m["world_size"] == 1 and m["test_samples"] == TEST_SAMPLES
    assert set(m) >= {"test_acc", "test_loss", "test_samples", "train_loss", "steps", "epochs", "world_size",
                      "mixed_precision", "train_images_per_sec", "wall_seconds"}

    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_000032", "step_000064", "step_000096"]
    state = load_file(checkpoints[-1] / "model.safetensors")
    AlexNet(width=0.125).load_state_dict(state)  # exactly the model's keys and shapes
    assert json.loads((checkpoints[-1] / "trainer_state.json").read_text())["step"] == 96

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert len(losses) == 96 // 4
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses  # it learns
    assert abs(scalars(run_dir, "test/acc")[-1][1] - m["test_acc"]) < 1e-6  # TensorBoard stores float32
    assert m["test_acc"] > 0.2


def test_bf16_on_cpu_runs_and_learns(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, data_dir, "--epochs", "3", "--mixed-precision", "bf16")
    m = metrics(run_dir)
    assert m["mixed_precision"] == "bf16"
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    assert m["test_acc"] > 0.2
