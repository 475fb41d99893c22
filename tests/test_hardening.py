"""Promises kept where a user meets them, beyond the one-line table of test_bad_input.py: an export never deletes
what it did not write, a profile cut short by a stop closes cleanly, the advice of an error works when followed,
the command line's own errors are one line, a second Ctrl-C ends without a traceback, torch.hub checks an
export's arguments before it builds the model, the divergence warning follows the README's rule, and the trackers
(MLflow, W&B) keep one history, start within a bounded time and say where they write."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from dist_alexnet.checkpoint import list_checkpoints
from tests.helpers import REPO, run, start, stop, tiny_args, wait_for_line


def one_error_line(result, words: str, alone: bool = False) -> None:
    """Exit 2, one error line with `words`, no traceback; `alone`: nothing else on stderr either."""
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dist-alexnet: error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if alone:
        assert result.stderr.strip() == errors[0]


def wait_until_it_catches(pid: int, sig: signal.Signals, timeout: float = 60) -> None:
    """Until process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) >> (sig - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never caught {sig.name}")


def tree(folder) -> dict:
    """Every file under `folder` with its size: what must be unchanged."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- export

def test_export_refuses_to_replace_a_run_directory_even_with_overwrite(tmp_path, trained_run):
    copy = shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    before = tree(copy)
    for extra in ([], ["--overwrite"]):
        result = run(["--checkpoint", str(copy), "--out", str(copy), *extra], subcommand="export", check=False)
        one_error_line(result, "holds the checkpoint being exported")
    other = shutil.copytree(trained_run, tmp_path / "other-run", symlinks=True)  # a run that is not the source
    (other / ".lock").write_text("")
    result = run(["--checkpoint", str(copy), "--out", str(other), "--overwrite"], subcommand="export", check=False)
    one_error_line(result, "is not an earlier export")
    assert tree(copy) == before and (other / "checkpoints").is_dir()


def test_export_into_a_non_empty_folder_needs_overwrite_and_replaces_only_an_export(tmp_path, trained_run):
    out = tmp_path / "export"
    run(["--checkpoint", str(trained_run), "--out", str(out)], subcommand="export")
    result = run(["--checkpoint", str(trained_run), "--out", str(out)], subcommand="export", check=False)
    one_error_line(result, "exists and is not empty; choose another --out, or add --overwrite")
    run(["--checkpoint", str(trained_run), "--out", str(out), "--overwrite"], subcommand="export")
    (out / "notes.txt").write_text("mine")
    result = run(["--checkpoint", str(trained_run), "--out", str(out), "--overwrite"], subcommand="export", check=False)
    one_error_line(result, "holds 'notes.txt', which no export writes")
    assert (out / "notes.txt").read_text() == "mine"


def test_the_exported_files_can_be_read_by_others(tmp_path, trained_run):
    out = tmp_path / "export"
    run(["--checkpoint", str(trained_run), "--out", str(out)], subcommand="export")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {modes["README.md"]} and modes["README.md"] & 0o044 == 0o044, modes


def test_torch_hub_checks_the_exports_arguments_before_building_the_model(tmp_path, trained_run):
    from dist_alexnet.errors import CheckpointError

    out = tmp_path / "export"
    run(["--checkpoint", str(trained_run), "--out", str(out)], subcommand="export")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "width": 40}))  # 3.9 GB of weights, were it built
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"config.json: width 40 is not in \(0, 4\]"):
        torch.hub.load(str(REPO), "alexnet", source="local", weights=str(out))
    assert time.perf_counter() - started < 5
    with pytest.raises(CheckpointError, match="dropout 2 is not in"):
        torch.hub.load(str(REPO), "alexnet", source="local", dropout=2)


# ----------------------------------------------------------------------------- the profiler

def test_a_profile_cut_short_by_a_preemption_closes_cleanly(tmp_path, data_dir):
    """Where the end is not known up front (a stop signal inside the window): the profile is closed and written,
    and the process exits 0 instead of dying of SIGSEGV."""
    run_dir = tmp_path / "run"
    proc = start(tiny_args(data_dir, run_dir, "--epochs", "1", "--profile-steps", "2:30"))
    try:
        wait_for_line(proc, "step 4/")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "the run stopped inside --profile-steps 2:30" in out and "preempted at step" in out
    assert json.loads((run_dir / "profile" / "rank0.json").read_text())["traceEvents"]


# ----------------------------------------------------------------------------- advice that works

def test_the_advice_for_a_checkpoint_of_another_width_works(tmp_path, trained_run, data_dir):
    copy = shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    refused = run(tiny_args(data_dir, copy, "--model-width", "0.25", "--max-steps", "2"), check=False)
    one_error_line(refused, "or here with --resume none --move-old-checkpoints")
    run(tiny_args(data_dir, copy, "--model-width", "0.25", "--max-steps", "2", "--resume", "none",
                  "--move-old-checkpoints"))
    assert [c.name for c in list_checkpoints(copy)] == ["step_000002"]


# ----------------------------------------------------------------------------- the command line itself

@pytest.mark.parametrize("argv, words", [
    (["train", "--epochs", "three"], "argument --epochs: invalid int value: 'three'; see `dist-alexnet train --help`"),
    (["train", "--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
    (["predict", "--checkpoint", "x"], "the following arguments are required: IMAGE"),
])
def test_a_command_line_error_is_one_line(argv, words):
    one_error_line(run(argv[1:], subcommand=argv[0], check=False), words, alone=True)


def test_a_second_ctrl_c_ends_at_once_without_a_traceback(tmp_path, data_dir):
    """Both during the set-up (the imports alone take seconds): the first asks for a clean stop, the second
    interrupts (two signals sent at once could reach the process as one)."""
    proc = start(tiny_args(data_dir, tmp_path / "run", "--epochs", "20"))
    try:
        wait_until_it_catches(proc.pid, signal.SIGUSR1)  # the preemption handlers are in place
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out
    assert "dist-alexnet: error: interrupted (Ctrl-C): stopped at once" in out
