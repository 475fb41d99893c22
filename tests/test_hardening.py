"""Promises kept where a user meets them, beyond the one-line table of test_bad_input.py: an export never deletes
what it did not write, a profile cut short by a stop closes cleanly, the advice of an error works when followed,
the command line's own errors are one line, a second Ctrl-C ends without a traceback, torch.hub checks an
export's arguments before it builds the model, the divergence warning follows the README's rule, and the trackers
(MLflow, W&B) keep one history, start within a bounded time and say where they write."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import torch

from dist_alexnet.checkpoint import list_checkpoints
from tests.helpers import REPO, Lines, cpu_env, event_record, run, scalars, start, stop, tiny_args


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


def test_report_of_a_run_whose_config_yaml_is_a_directory_takes_the_config_from_the_events(tmp_path, trained_run):
    copy = shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    (copy / "config.yaml").unlink()
    (copy / "config.yaml").mkdir()
    result = run([str(copy)], subcommand="report")
    assert result.stdout.strip() == str(copy / "report.md") and "Traceback" not in result.stderr
    assert "model_width: 0.125" in (copy / "report.md").read_text()


def test_a_report_that_cannot_be_written_leaves_the_old_one_whole(tmp_path, trained_run):
    """Every file goes through one atomic writer: under a file size limit of 8 KB (ulimit -f 8) the report fails
    in one line, and the figures and report.md already there are left as they were, with no temporary beside."""
    copy = shutil.copytree(trained_run, tmp_path / "run", symlinks=True)
    run([str(copy)], subcommand="report")  # the figures and the report as they are
    before = {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()}
    assert max(len(data) for name, data in before.items() if name.endswith(".png")) > 8192
    limited = run([str(copy)], subcommand="report", prefix=["prlimit", "--fsize=8192"], check=False)
    assert limited.returncode == 2 and "Traceback" not in limited.stderr, limited.stderr
    assert len(limited.stderr.splitlines()) == 1 and "File too large" in limited.stderr, limited.stderr
    assert {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()} == before


def test_file_names_that_are_not_utf8_work_or_are_refused_before_anything_is_made(tmp_path, data_dir):
    """A Latin-1 "café" (byte 0xe9) as --data-dir trains, and TensorBoard's text and hparams show it as caf\\xe9;
    as --output-dir, which TensorBoard's writer cannot take, one line before any directory is made."""
    import os

    latin1 = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    os.makedirs(os.fsencode(latin1))
    shutil.copytree(data_dir, latin1, dirs_exist_ok=True)
    run(tiny_args(latin1, tmp_path / "run", "--max-steps", "1"))
    from tensorboard.util import tensor_util

    (event,) = event_record(tmp_path / "run").Tensors("run/config")
    assert "caf\\xe9" in tensor_util.make_ndarray(event.tensor_proto).item().decode()
    refused = run(tiny_args(data_dir, latin1 + "/run", "--max-steps", "1"), check=False)
    assert refused.returncode == 2 and "caf\\xe9/run is not a valid UTF-8 name" in refused.stderr, refused.stderr
    assert not os.path.exists(os.fsencode(latin1 + "/run"))


# ----------------------------------------------------------------------------- the profiler

@pytest.mark.slow
def test_a_profile_cut_short_by_a_preemption_closes_cleanly(tmp_path, data_dir):
    """Where the end is not known up front (a stop signal inside the window): the profile is closed and written,
    and the process exits 0 instead of dying of SIGSEGV."""
    run_dir = tmp_path / "run"
    proc = start(tiny_args(data_dir, run_dir, "--epochs", "1", "--profile-steps", "2:30"))
    output = Lines(proc)
    try:
        output.wait_for("step 4/")
        proc.send_signal(signal.SIGTERM)
        output.finish(timeout=120)
        out = output.text()
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
    (["benchmark", "--no-such-option"], "unrecognized arguments: --no-such-option; see `dist-alexnet benchmark --help`"),
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


# ----------------------------------------------------------------------------- the trackers

def mlflow_scalars(uri: str, run_id: str, tag: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, tag))


def interrupted_after_logging(data_dir, run_dir, env, *extra):
    """A run that logged steps 4, 8 and 12 but whose last checkpoint is step 8: as if killed after step 12."""
    run(tiny_args(data_dir, run_dir, "--max-steps", "12", "--checkpoint-every", "8", "--report-to",
                  "tensorboard,mlflow", *extra), env=env)
    shutil.rmtree(run_dir / "checkpoints" / "step_000012")


def test_mlflow_shows_tensorboards_history_after_a_resume_with_another_lr(tmp_path, data_dir):
    """Steps 9-12 retrained with another learning rate: MLflow continues in a new run that starts with the old one's
    steps up to 8. (With the same options they are the same figures and MLflow keeps its run: test_ecosystem.py.)"""
    uri, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    env = cpu_env(MLFLOW_TRACKING_URI=uri)
    interrupted_after_logging(data_dir, run_dir, env)
    first_id = json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"]
    resumed = run(tiny_args(data_dir, run_dir, "--max-steps", "16", "--report-to", "tensorboard,mlflow", "--lr",
                            "3e-4"), env=env)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"]
    assert run_id != first_id and "continues in new runs" in resumed.stdout
    for tag in ("train/loss", "train/lr"):
        board = scalars(run_dir, tag)
        assert [s for s, _ in board] == [4, 8, 12, 16]
        tracked = mlflow_scalars(uri, run_id, tag)
        assert [s for s, _ in tracked] == [4, 8, 12, 16], tag  # each step once
        assert [v for _, v in tracked] == pytest.approx([v for _, v in board], rel=1e-6), tag


def test_mlflow_without_a_tracking_uri_writes_into_the_run_directory_and_says_so(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    env = cpu_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    result = run(tiny_args(data_dir, run_dir, "--max-steps", "4", "--report-to", "mlflow"), env=env, cwd=tmp_path)
    assert f"the run goes into {run_dir.resolve() / 'mlflow.db'}" in result.stdout
    assert (run_dir / "mlflow.db").is_file() and not (tmp_path / "mlflow.db").exists()


class SilentServer:
    """A TCP port that accepts connections and never answers: a tracking server that hangs."""

    def __enter__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        return self

    def connected(self, timeout: float = 60) -> None:
        """Until a client connected (the run is starting its trackers)."""
        self.socket.settimeout(timeout)
        self.client = self.socket.accept()[0]

    def __exit__(self, *exc):
        self.socket.close()


def test_an_unreachable_mlflow_server_is_one_line_naming_it_within_the_timeout(tmp_path, data_dir):
    with SilentServer() as server:
        started = time.perf_counter()
        result = run(tiny_args(data_dir, tmp_path / "run", "--max-steps", "4", "--report-to", "mlflow",
                               "--tracker-timeout", "2"), env=cpu_env(MLFLOW_TRACKING_URI=server.uri), check=False)
        took = time.perf_counter() - started
    one_error_line(result, f"a tracker could not start (mlflow at {server.uri};")
    assert took < 30, took  # MLflow's own retries took 4.5 minutes


@pytest.mark.slow
def test_a_preemption_signal_while_the_trackers_start_stops_the_run(tmp_path, data_dir):
    with SilentServer() as server:
        proc = start(tiny_args(data_dir, tmp_path / "run", "--max-steps", "4", "--report-to", "mlflow"),
                     env=cpu_env(MLFLOW_TRACKING_URI=server.uri))
        try:
            server.connected()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)  # not --tracker-timeout's 30 s
        finally:
            stop(proc)
    assert proc.returncode == 130, out[-3000:]
    assert "stopped by SIGTERM while the trackers were starting" in out and "Traceback" not in out


def test_a_damaged_trackers_json_is_said(tmp_path, data_dir):
    uri, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    env = cpu_env(MLFLOW_TRACKING_URI=uri)
    run(tiny_args(data_dir, run_dir, "--max-steps", "4", "--report-to", "mlflow"), env=env)
    (run_dir / "trackers.json").write_text('{"mlflow_run_id": ')
    result = run(tiny_args(data_dir, run_dir, "--max-steps", "8", "--report-to", "mlflow"), env=env)
    assert f"warning: {run_dir / 'trackers.json'} is damaged" in result.stdout


# ----------------------------------------------------------------------------- the divergence warning

def chance_warnings(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("WARNING: training diverged")]


def test_the_divergence_warning_keeps_to_the_readmes_rule_and_its_advice_fits_the_run(tmp_path, data_dir):
    """The default run's loss is 2.29 after one epoch and learning: no warning (it fired at 2.285). Stuck at 2.30
    with a learning rate far too low: advice to raise it, not to lower it."""
    learning = run(tiny_args(data_dir, tmp_path / "default", "--epochs", "2"))
    assert chance_warnings(learning) == [], learning.stdout
    stuck = run(tiny_args(data_dir, tmp_path / "low", "--epochs", "2", "--lr", "1e-6"))
    warnings = chance_warnings(stuck)
    assert len(warnings) == 1, stuck.stdout
    assert "the learning rate is very low for Adam (--lr 1e-06)" in warnings[0] and "lower" not in warnings[0]


@pytest.mark.parametrize("optimizer, lr, words", [
    ("adam", 1e-2, "too high for Adam (--lr 0.01)"),
    ("adam", 5e-4, "in Adam's usual range, so lowering it is unlikely to help"),
    ("sgd", 1e-5, "very low for SGD"),
    ("sgd", 2.0, "too high for SGD"),
])
def test_the_advice_for_a_run_at_chance_follows_its_optimizer_and_learning_rate(optimizer, lr, words):
    from dist_alexnet.monitor import stuck_advice

    assert words in stuck_advice(optimizer, lr)


# ----------------------------------------------------------------------------- several processes

@pytest.mark.slow
@pytest.mark.parametrize("bad", [["--batch-size", "5000"], ["--global-batch-size", "33", "--grad-accum", "2"],
                                 ["--batch-size", "16", "--epochs", "1", "--profile-steps", "10:40"]],
                         ids=["batch", "global batch", "profile"])
def test_bad_input_on_two_processes_ends_every_rank_with_exit_code_2(tmp_path, data_dir, bad):
    """The launcher stops the other rank once one has exited; it must still exit 2 (it died of that SIGTERM, or of
    SIGABRT in its process group's threads, in about one run of two)."""
    result = run(tiny_args(data_dir, tmp_path / "run", *bad), processes=2, check=False)
    codes = [line.split(":", 1)[1].split()[0] for line in result.stderr.splitlines() if line.strip().startswith("exitcode")]
    assert codes == ["2", "2"], result.stderr[-3000:]
    assert len([line for line in result.stderr.splitlines() if line.startswith("dist-alexnet: error:")]) == 2


def test_moving_the_old_run_aside_moves_its_tracker_runs_too(tmp_path, data_dir):
    uri, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    env = cpu_env(MLFLOW_TRACKING_URI=uri)
    run(tiny_args(data_dir, run_dir, "--max-steps", "12", "--checkpoint-every", "8", "--report-to", "mlflow"), env=env)
    old_id = json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"]
    run(tiny_args(data_dir, run_dir, "--max-steps", "16", "--report-to", "mlflow", "--resume",
                  str(run_dir / "checkpoints" / "step_000008"), "--move-old-checkpoints"), env=env)
    [moved] = run_dir.glob("old-*")
    assert json.loads((moved / "trackers.json").read_text())["mlflow_run_id"] == old_id
    new_id = json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"]
    assert new_id != old_id and [s for s, _ in mlflow_scalars(uri, new_id, "train/loss")] == [12, 16]


@pytest.mark.slow
def test_wandb_continues_in_a_new_run_after_a_resume_with_other_options(tmp_path, data_dir):
    """W&B cannot take back steps it has: retrained with another learning rate, they go to a new W&B run (offline:
    a new folder of its own id); retrained with the same options, to the same run."""
    run_dir, env = tmp_path / "run", cpu_env(WANDB_MODE="offline", WANDB_SILENT="true")
    args = ["--report-to", "wandb,tensorboard"]
    run(tiny_args(data_dir, run_dir, "--max-steps", "12", "--checkpoint-every", "8", *args), env=env,
        in_process=False)
    first = json.loads((run_dir / "trackers.json").read_text())["wandb_run_id"]
    shutil.rmtree(run_dir / "checkpoints" / "step_000012")
    same = run(tiny_args(data_dir, run_dir, "--max-steps", "12", *args), env=env, in_process=False)
    assert json.loads((run_dir / "trackers.json").read_text())["wandb_run_id"] == first, same.stdout
    shutil.rmtree(run_dir / "checkpoints" / "step_000012")
    other = run(tiny_args(data_dir, run_dir, "--max-steps", "16", "--lr", "3e-4", *args), env=env, in_process=False)
    second = json.loads((run_dir / "trackers.json").read_text())["wandb_run_id"]
    assert second != first and "continues in new runs" in other.stdout
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{second}"))) == 1


@pytest.mark.slow
def test_ranks_started_with_different_options_or_data_stop_before_any_work(tmp_path, data_dir):
    """Every rank compares the options and a fingerprint of its data with rank 0's before training: a difference
    is one line on every rank naming the option (or the data) and the ranks, instead of DDP's tracebacks or a
    collective timeout blaming a hung rank."""
    from dist_alexnet.datasets import read_idx, write_idx
    from tests.helpers import TINY, assert_clean_failure, command, run_ranks, tiny_raw_dir

    ranks = [command(tiny_args(data_dir, tmp_path / "run", "--max-steps", "1", "--lr", lr), 1)
             for lr in ("1e-3", "1e-2")]
    lr = run_ranks(ranks, 2, cpu_env(), REPO, 120)
    assert "--lr is 0.001 on rank 0 but rank 1: 0.01" in assert_clean_failure(lr, processes=2, launcher=False)

    copies = []
    for node in ("a", "b"):  # each "node" its own copy of the data
        raw = shutil.copytree(tiny_raw_dir(data_dir), tmp_path / node / "FashionMNIST" / "raw")
        copies.append(raw.parent.parent)
    labels = read_idx(copies[1] / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", 1)
    labels[0] = (labels[0] + 1) % 10  # one test label differs: still a valid file
    write_idx(copies[1] / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", labels)
    ranks = [command([*TINY, "--dataset", "fashion-mnist", "--no-download", "--data-dir", str(copy), "--max-steps",
                      "1", "--output-dir", str(tmp_path / "run2")], 1) for copy in copies]
    data = run_ranks(ranks, 2, cpu_env(), REPO, 120)
    message = assert_clean_failure(data, processes=2, launcher=False)
    assert "the ranks disagree on their data: test set is" in message and "rank 1:" in message
