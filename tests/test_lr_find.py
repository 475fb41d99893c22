"""`dist-alexnet lr-find`: the range test's outputs (JSON, plot, TensorBoard), its suggestion inside the swept
range, its refusal of a run directory with checkpoints, its one-line errors, and a run on 2 processes."""

from __future__ import annotations

import json
import math

import pytest

from dist_alexnet.lr_sweep import Sweep, smooth, suggest
from tests.helpers import TINY, run, scalars, train_tiny

SWEEP = ["--num-steps", "40", "--start-lr", "1e-5", "--end-lr", "1"]
TINY_LR_FIND = [option for option in TINY if option != "--no-log-figures"]  # lr-find draws no evaluation figures


def lr_find_tiny(data_dir, out, *extra, processes=1, check=True):
    return run([*TINY_LR_FIND, "--data-dir", str(data_dir), "--output-dir", str(out), *SWEEP, *extra],
               processes=processes, subcommand="lr-find", check=check)


def test_lr_find_writes_its_json_plot_and_scalars_and_no_checkpoint(tmp_path, data_dir):
    out = tmp_path / "lr"
    result = lr_find_tiny(data_dir, out, "--json", str(tmp_path / "lr.json"))
    assert "suggested lr" in result.stdout
    found = json.loads((tmp_path / "lr.json").read_text())
    assert found == json.loads((out / "lr_find.json").read_text())
    assert any("suggest" in key for key in found)
    steps = found["steps"]
    assert 2 < steps <= 40 and len(found["lrs"]) == len(found["losses"]) == len(found["smoothed_losses"]) == steps
    assert found["lrs"][0] == pytest.approx(1e-5) and all(a < b for a, b in zip(found["lrs"], found["lrs"][1:]))
    assert 1e-5 <= found["suggested_lr"] <= 1 and found["lrs"][0] <= found["min_loss_lr"] <= found["lrs"][-1]
    assert found["world_size"] == 1 and found["global_batch"] == 32
    assert (out / "lr_find.png").stat().st_size > 10_000
    assert len(scalars(out, "lr_find/smoothed_loss")) == len(scalars(out, "lr_find/lr")) == steps
    assert scalars(out, "lr_find/suggested_lr")[0][1] == pytest.approx(found["suggested_lr"])
    assert not (out / "checkpoints").exists()
    assert not list(tmp_path.rglob("*.safetensors"))


def test_lr_find_refuses_a_run_directory_with_checkpoints(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, data_dir, "--max-steps", "2")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = lr_find_tiny(data_dir, run_dir, check=False)
    assert result.returncode == 2
    assert "holds a training run's checkpoints" in result.stderr and len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert not (run_dir / "lr_find.json").exists()


@pytest.mark.parametrize("bad, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr"),
    (["--num-steps", "5"], "--num-steps"),
    (["--smoothing", "1"], "--smoothing"),
    (["--weight-decay", "-1"], "--weight-decay"),
])
def test_bad_lr_find_options_get_one_line_and_exit_2(tmp_path, data_dir, bad, message):
    result = run([*TINY_LR_FIND, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "lr"), *bad],
                 subcommand="lr-find", check=False)
    assert result.returncode == 2 and message in result.stderr
    assert all(line.startswith("dist-alexnet: error:") for line in result.stderr.splitlines())
    assert not (tmp_path / "lr").exists()


def test_the_suggestion_is_the_minimum_over_ten_and_stays_in_range():
    sweep = Sweep(1e-4, 1.0, 50)
    lrs = [sweep.lr(i) for i in range(50)]
    valley = [2.3 - math.exp(-((math.log10(lr) + 2) ** 2)) for lr in lrs]  # lowest at lr 1e-2
    found = suggest(lrs, smooth(valley, 0.0), sweep)
    assert found["min_loss_lr"] == pytest.approx(1e-2, rel=0.3)
    assert found["suggested_lr"] == pytest.approx(found["min_loss_lr"] / 10) and found["note"] is None
    assert found["steepest_lr"] < found["min_loss_lr"]
    early = suggest(lrs, smooth([2.0 + lr for lr in lrs], 0.0), sweep)  # lowest at the start: clamped, with a note
    assert early["suggested_lr"] >= 1e-4 and "lower --start-lr" in early["note"]


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])


@pytest.mark.slow
def test_lr_find_on_two_processes_shares_one_global_batch(tmp_path, data_dir):
    out = tmp_path / "lr2"
    lr_find_tiny(data_dir, out, "--num-steps", "20", processes=2)
    found = json.loads((out / "lr_find.json").read_text())
    assert found["world_size"] == 2 and found["global_batch"] == 64 and found["steps"] == 20
    assert 1e-5 <= found["suggested_lr"] <= 1
