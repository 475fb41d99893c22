"""Crash and hang recovery: workers killed with kill -9 at several moments under torchrun and `accelerate launch`
with restarts (the job finishes by itself, every step once, no sample repeated or skipped from the restored
checkpoint), a SIGSTOPped rank (the other fails within --collective-timeout with one line, then the launcher
recovers), checkpoints by time, one run per run directory, and the red-team findings: a resume with changed
options, fresh starts into a directory with newer checkpoints, damaged checkpoint contents, results and early
signals, resource bounds."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dist_alexnet.checkpoint import list_checkpoints
from dist_alexnet.datasets import SYNTHETIC_SEED, make_synthetic, synthetic_root
from tests.helpers import (Lines, accelerate_with, cpu_env, fake_scontrol, free_port, kill_tree, metrics, run,
                           scalars, start, tiny_args, torchrun, train_tiny, worker_pids)

# A test set of 1,000: an evaluation lasts long enough to be killed in.
TEST_SIZE = 1000
RECOVERY = ["--synthetic-test-size", str(TEST_SIZE), "--log-every", "1", "--checkpoint-every", "5"]


@pytest.fixture(scope="module")
def recovery_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recovery-data")
    make_synthetic(synthetic_root(folder, 1024, TEST_SIZE, SYNTHETIC_SEED), 1024, TEST_SIZE, SYNTHETIC_SEED)
    return folder


def launch_with_restarts(launcher: str, args: list[str], restarts: int, env: dict) -> subprocess.Popen:
    """2 CPU processes under torchrun or `accelerate launch` (the repository's config), c10d rendezvous, a
    fresh store for each round's workers (as launch/slurm/node_launch.sh and `make train` set it)."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    if launcher == "torchrun":
        return start(args, env=env, launcher=torchrun("--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                                                      "--max-restarts", str(restarts)))
    return start(args, env=dict(env, PET_RDZV_ENDPOINT=endpoint), launcher=accelerate_with(
        "launch/accelerate/cpu_2proc.yaml", "--rdzv_backend", "c10d", "--max_restarts", str(restarts)))


def kill_rank(launcher_pid: int, rank: int, sig=signal.SIGKILL) -> None:
    workers = worker_pids(launcher_pid)
    assert rank in workers, f"no worker of rank {rank} under {launcher_pid}: {workers}"
    os.kill(workers[rank], sig)


def samples_by_step(log_dir: Path) -> dict[int, list[int]]:
    """Each epoch's samples as the finished job trained them: for every (rank, epoch, step), the records of the
    last attempt that trained that step (an attempt killed mid-way was redone from its checkpoint)."""
    def attempt_order(file: Path):
        return file.stat().st_mtime  # an attempt's last write comes before the next attempt's

    latest: dict[tuple, list[int]] = {}
    for file in sorted(log_dir.glob("*.txt"), key=attempt_order):
        rank = file.name.split("-")[0]
        steps: dict[tuple, list[int]] = {}
        for line in file.read_text().splitlines():
            epoch, step, index = map(int, line.split())
            steps.setdefault((rank, epoch, step), []).append(index)
        latest.update(steps)
    epochs: dict[int, list[int]] = {}
    for (_, epoch, _), indices in latest.items():
        epochs.setdefault(epoch, []).extend(indices)
    return epochs


def check_recovered_run(run_dir: Path, log_dir: Path, total: int) -> None:
    m = metrics(run_dir)
    assert m["steps"] == total and m["world_size"] == 2 and m["test_samples"] == TEST_SIZE
    assert [s for s, _ in scalars(run_dir, "train/loss")] == list(range(1, total + 1))  # every step exactly once
    for epoch, indices in samples_by_step(log_dir).items():
        assert sorted(indices) == list(range(1024)), f"epoch {epoch}: samples repeated or skipped"


# ----------------------------------------------------------------------------- a worker killed

# Each moment once, shared between the two launchers (either one restarts the group the same way; what differs
# between the moments is what the trainer resumes from).
KILLS = {  # when to kill, which rank: (what to wait for, rank, what the moment is)
    "torchrun": [(r"saved checkpoint .*step_000005", 1, "mid-epoch, after a checkpoint"),
                 ("checkpoint-tmp", 0, "rank 0 writing a checkpoint")],
    "accelerate": [(r"step 48/64 \|", 1, "the evaluation at an epoch's end"),
                   (r"step \d+/64 \|", 1, "right after a restart")],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_a_killed_worker_restarts_the_group_which_resumes_and_finishes(launcher, tmp_path, recovery_data):
    run_dir, log_dir = tmp_path / "run", tmp_path / "samples"
    kills = KILLS[launcher]
    proc = launch_with_restarts(launcher, tiny_args(recovery_data, run_dir, "--epochs", "4", *RECOVERY), len(kills),
                                cpu_env(DIST_ALEXNET_SAMPLE_LOG=log_dir))
    out, recovered, delays = Lines(proc), 0, []
    try:
        position = 0  # the output is read from here on: the line after the previous trial's resume
        for wanted, rank, moment in kills:
            if wanted == "checkpoint-tmp":  # the next checkpoint being written: kill rank 0 as it writes
                deadline = time.monotonic() + 120
                while not list((run_dir / "checkpoints").glob(".tmp-*")) and time.monotonic() < deadline:
                    time.sleep(0.005)
            else:
                position = out.wait_for(wanted, after=position).index
                if "32/64" in wanted or "48/64" in wanted:
                    time.sleep(0.3)  # into the evaluation that follows an epoch's last step
            killed_at = time.monotonic()
            kill_rank(proc.pid, rank)
            position, resumed_at, _ = out.wait_for(r"^resumed from .* at step \d+", after=len(out.lines))
            delays.append(resumed_at - killed_at)
            recovered += 1
            print(f"{launcher}: killed rank {rank} ({moment}); resumed {resumed_at - killed_at:.1f} s later: "
                  f"{out.lines[position][1].strip()}")
            position += 1
        assert out.finish(timeout=300) == 0, out.text()[-4000:]
    finally:
        kill_tree(proc.pid)
    check_recovered_run(run_dir, log_dir, total=64)
    print(f"{launcher}: {recovered}/{len(kills)} kill -9 trials recovered; kill to resumed "
          f"{min(delays):.1f}-{max(delays):.1f} s")


# ----------------------------------------------------------------------------- a rank that stalls

@pytest.mark.slow
def test_a_stopped_rank_is_detected_within_the_timeout_and_the_job_recovers(tmp_path, recovery_data):
    run_dir, timeout = tmp_path / "run", 10
    args = tiny_args(recovery_data, run_dir, "--epochs", "2", *RECOVERY, "--collective-timeout", str(timeout))
    proc = launch_with_restarts("torchrun", args, 1, cpu_env())
    out = Lines(proc)
    try:
        position = out.wait_for(r"step 8/32 \|").index
        stopped_at = time.monotonic()
        kill_rank(proc.pid, 1, signal.SIGSTOP)
        index, detected_at, _ = out.wait_for(r"dist-alexnet: error: rank 0: .* no answer from another rank within "
                                             rf"--collective-timeout {timeout} s", after=position)
        assert out.lines[index][1].count("dist-alexnet: error:") == 1
        assert timeout - 1 <= detected_at - stopped_at <= timeout + 15, detected_at - stopped_at
        # Let the stopped rank go on, so that it answers the launcher's SIGTERM: still stopped, it would be
        # killed only after torch elastic's 30 s grace, which adds nothing to what this test proves.
        kill_rank(proc.pid, 1, signal.SIGCONT)
        out.wait_for(r"^resumed from .* at step 5", after=index)  # the launcher replaced the stopped process
        assert out.finish(timeout=300) == 0, out.text()[-4000:]
    finally:
        kill_tree(proc.pid)
    assert metrics(run_dir)["steps"] == 32
    print(f"stopped rank detected after {detected_at - stopped_at:.1f} s (--collective-timeout {timeout})")


# ----------------------------------------------------------------------------- checkpoints by time, one writer

def test_checkpoint_minutes_checkpoints_by_time(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # 6 ms: a checkpoint is due after every step, however fast or loaded the machine
    result = train_tiny(run_dir, data_dir, "--max-steps", "20", "--checkpoint-minutes", "0.0001",
                        "--keep-checkpoints", "50")
    saved = [int(step) for step in re.findall(r"saved checkpoint .*step_(\d+)", result.stdout)]
    assert len(saved) >= 4 and saved[-1] == 20 and any(step % 32 for step in saved[:-1]), saved  # not epoch ends


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    first = start(tiny_args(data_dir, run_dir, "--epochs", "2", "--log-every", "1"))
    output = Lines(first)
    try:
        output.wait_for("step 3/")
        second = train_tiny(run_dir, data_dir, "--epochs", "3", check=False)
        assert second.returncode == 2
        assert re.fullmatch(rf"dist-alexnet: error: output directory {run_dir} is in use by another run \(host \S+, "
                            rf"pid {first.pid}, started [0-9T:-]+\): two runs would mix their checkpoints and "
                            rf"TensorBoard events; wait for it to end, or choose another --output-dir\n",
                            second.stderr), second.stderr
        assert output.finish(timeout=120) == 0, output.text()[-3000:]
    finally:
        first.kill()
    assert metrics(run_dir)["steps"] == 64 and len(list((run_dir / "tensorboard").iterdir())) == 1
    # once the first is gone, the directory is free again
    assert train_tiny(run_dir, data_dir, "--epochs", "3").returncode == 0 and metrics(run_dir)["steps"] == 96


# ----------------------------------------------------------------------------- red team: resume with other options

def resumable(trained_run: Path, tmp_path: Path) -> Path:
    return shutil.copytree(trained_run, tmp_path / "run", symlinks=True)


def test_a_changed_learning_rate_applies_on_resume_and_the_log_says_so(tmp_path, trained_run, data_dir):
    run_dir = resumable(trained_run, tmp_path)
    result = train_tiny(run_dir, data_dir, "--epochs", "3", "--lr", "1e-4", "--weight-decay", "0.01")
    assert "resume: --lr 0.001 -> 0.0001 from step 64" in result.stdout
    assert "resume: --weight-decay 0.0 -> 0.01 from step 64" in result.stdout
    assert [lr for step, lr in scalars(run_dir, "train/lr") if step > 64] == pytest.approx([1e-4] * 8)
    optimizer = torch.load(list_checkpoints(run_dir)[-1] / "optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["weight_decay"] == 0.01  # the saved state, today's options


@pytest.mark.parametrize("option, words", [
    (["--image-size", "96"], "--image-size is 96 but {ckpt} was trained with 64: the model learned from images of "
                             "the checkpoint's size; resume with --image-size 64, or start a new run in another "
                             "--output-dir"),
    (["--optimizer", "sgd"], "--optimizer is sgd but {ckpt} was trained with adam"),
])
def test_options_a_resume_cannot_take_are_refused_with_one_line(tmp_path, trained_run, data_dir, option, words):
    run_dir = resumable(trained_run, tmp_path)
    result = train_tiny(run_dir, data_dir, "--epochs", "3", *option, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert words.format(ckpt=list_checkpoints(run_dir)[-1]) in result.stderr


def test_a_seed_changed_mid_epoch_is_refused_but_not_at_an_epoch_end(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, data_dir, "--epochs", "2", "--max-steps", "40")  # stops at step 40, mid-epoch 2
    refused = train_tiny(run_dir, data_dir, "--epochs", "2", "--seed", "5", check=False)
    assert refused.returncode == 2 and "the rest of the epoch would be drawn in another order" in refused.stderr
    at_the_end = tmp_path / "at-the-end"
    train_tiny(at_the_end, data_dir, "--epochs", "1")
    resumed = train_tiny(at_the_end, data_dir, "--epochs", "2", "--seed", "5")
    assert "resume: --seed 0 -> 5 from step 32" in resumed.stdout


# ----------------------------------------------------------------------------- red team: newer checkpoints

def test_a_fresh_start_into_a_directory_with_newer_checkpoints_is_refused_or_moves_them(tmp_path, trained_run,
                                                                                      data_dir):
    run_dir = resumable(trained_run, tmp_path)
    for start_from in (["--resume", "none"], ["--resume", str(list_checkpoints(run_dir)[0])]):
        refused = train_tiny(run_dir, data_dir, "--epochs", "3", *start_from, check=False)
        assert refused.returncode == 2 and "holds checkpoints up to step_000064, past the step this run starts from" \
            in refused.stderr, refused.stderr
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_000032", "step_000064"]  # untouched
    moved = train_tiny(run_dir, data_dir, "--epochs", "1", "--resume", "none", "--move-old-checkpoints")
    old = Path(re.search(r"moved the earlier run's checkpoints, events and results to (\S+)", moved.stdout).group(1))
    assert sorted(p.name for p in (old / "checkpoints").iterdir() if p.name.startswith("step")) == \
        ["step_000032", "step_000064"]
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_000032"] and metrics(run_dir)["steps"] == 32


def test_retention_keeps_the_checkpoint_a_run_resumed_from(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, data_dir, "--epochs", "1")  # step_000032
    train_tiny(run_dir, data_dir, "--epochs", "3", "--checkpoint-every", "8", "--keep-checkpoints", "2")
    assert "step_000032" in [c.name for c in list_checkpoints(run_dir)]


# ----------------------------------------------------------------------------- red team: damaged checkpoints

def edit_state(key, value):
    def edit(checkpoint: Path):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if key is None:
            state = value
        elif value is KeyError:
            del state[key]
        else:
            state[key] = value
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return edit


def edit_tensors(file, change):
    def edit(checkpoint: Path):
        from safetensors.torch import load_file, save_file

        if file.endswith(".safetensors"):
            tensors = load_file(checkpoint / file)
            change(tensors)
            save_file(tensors, checkpoint / file)
        else:
            content = torch.load(checkpoint / file, weights_only=True)
            torch.save(change(content) or content, checkpoint / file)
    return edit


def wrong_shape(tensors):
    tensors["classifier.7.bias"] = torch.zeros(11)


def missing_weight(tensors):
    del tensors["features.0.weight"]


def one_group_too_many(optimizer):
    optimizer["param_groups"].append(dict(optimizer["param_groups"][0], params=[99]))


DAMAGE = {
    "a key missing": (edit_state("epoch", KeyError), "lacks 'epoch'"),
    "a step that is not a number": (edit_state("step", "abc"), "step is 'abc', not a whole number"),
    "a list instead of the state": (edit_state(None, [1, 2]), "holds a list, not the trainer's state"),
    "a step that disagrees with the name": (edit_state("step", 63), "says step 63 but the checkpoint is step_000064"),
    "a weight of the wrong shape": (edit_tensors("model.safetensors", wrong_shape), "classifier.7.bias is (11,)"),
    "a weight missing": (edit_tensors("model.safetensors", missing_weight), "features.0.weight is missing"),
    "optimizer groups of the wrong size": (edit_tensors("optimizer.pt", one_group_too_many), "parameter groups"),
    "a malformed RNG state": (edit_tensors("rng_states.pt", lambda states: [{"cpu": "x"}]), "one RNG state per rank"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_contents_fall_back_or_are_one_line(damage, tmp_path, trained_run, data_dir):
    run_dir = resumable(trained_run, tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    edit, words = DAMAGE[damage]
    edit(newest)
    explicit = train_tiny(tmp_path / "elsewhere", data_dir, "--epochs", "3", "--resume", str(newest), check=False)
    assert explicit.returncode == 2 and explicit.stderr.count("\n") == 1 and words in explicit.stderr, explicit.stderr
    assert "Traceback" not in explicit.stderr
    auto = train_tiny(run_dir, data_dir, "--epochs", "3", "--max-steps", "34")  # two steps past the one it resumes at
    assert f"skipping checkpoint {newest}" in auto.stdout and words in auto.stdout
    assert "resumed from" in auto.stdout and "at step 32" in auto.stdout and metrics(run_dir)["steps"] == 34


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_and_nothing_is_deleted(tmp_path, trained_run, data_dir):
    """Never a fresh start among an old run's checkpoints (retention would then delete the new run's): one line
    naming each checkpoint and why, and how to start afresh; every file left as it was."""
    run_dir = resumable(trained_run, tmp_path)
    for checkpoint in list_checkpoints(run_dir):
        edit_state("applied_steps", -5)(checkpoint)
    before = sorted(str(path) for path in run_dir.rglob("*"))
    auto = train_tiny(run_dir, data_dir, "--epochs", "3", check=False)
    assert auto.returncode == 2 and "Traceback" not in auto.stderr, auto.stderr
    (line,) = [line for line in auto.stderr.splitlines() if line.startswith("dist-alexnet: error:")]
    assert "none of the 2 checkpoint(s)" in line and "step_000032" in line and "step_000064" in line
    assert "--resume none --move-old-checkpoints" in line
    assert sorted(str(path) for path in run_dir.rglob("*")) == before


def test_resume_from_a_run_directory_takes_its_newest_checkpoint(tmp_path, trained_run, data_dir):
    """--resume RUN_DIR, as evaluate, predict and export accept a run directory."""
    out = train_tiny(tmp_path / "next", data_dir, "--epochs", "3", "--max-steps", "65", "--resume", str(trained_run))
    assert f"resumed from {list_checkpoints(trained_run)[-1]} at step 64" in out.stdout
    assert metrics(tmp_path / "next")["steps"] == 65


# ----------------------------------------------------------------------------- red team: results, early signals

def test_rerunning_a_finished_run_keeps_strict_json_and_the_last_training_loss(tmp_path, trained_run, data_dir):
    run_dir = resumable(trained_run, tmp_path)
    before = metrics(run_dir)
    train_tiny(run_dir, data_dir, "--epochs", "2")  # nothing left to train: it evaluates again
    text = (run_dir / "metrics.json").read_text()
    after = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert after["train_loss"] == before["train_loss"] and after["train_images_per_sec"] is None
    assert after["test_acc"] == before["test_acc"]
    assert "n/a (this launch trained nothing)" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("content", ['{"test_acc": 0.5', "[1, 2]", ""])
def test_report_of_a_run_with_a_damaged_metrics_file_still_works(tmp_path, trained_run, content):
    run_dir = resumable(trained_run, tmp_path)
    (run_dir / "metrics.json").write_text(content)
    result = run([str(run_dir)], subcommand="report")
    assert "did not finish" in Path(result.stdout.strip()).read_text()


@pytest.mark.slow
def test_an_early_preemption_signal_saves_and_requeues_instead_of_killing(tmp_path, data_dir):
    env, record = fake_scontrol(tmp_path, "4343")
    proc = start(tiny_args(data_dir, tmp_path / "run", "--epochs", "2"), env=env)
    time.sleep(0.8)  # still importing torch
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "preempted at step 1 by SIGUSR1" in out, out[-3000:]
    assert record.read_text().split() == ["requeue", "4343"]


# ----------------------------------------------------------------------------- red team: resource bounds

def test_predict_refuses_an_image_of_too_many_pixels_with_one_line(tmp_path, trained_run):
    from PIL import Image

    Image.new("L", (12000, 12000)).save(tmp_path / "huge.png")  # about 140 KB on disk
    result = run(["--checkpoint", str(trained_run), str(tmp_path / "huge.png")], subcommand="predict", check=False)
    assert result.returncode == 2 and "12000x12000 pixels is more than the 40 megapixels" in result.stderr


def test_evaluate_of_an_export_writes_no_data_where_its_card_points(tmp_path, trained_run):
    run(["--checkpoint", str(trained_run), "--out", str(tmp_path / "export")], subcommand="export")
    card_file = tmp_path / "export" / "config.json"
    card = json.loads(card_file.read_text())
    card["training_config"]["data_dir"] = str(tmp_path / "elsewhere")
    card_file.write_text(json.dumps(card))
    result = run(["--checkpoint", str(tmp_path / "export"), "--json"], subcommand="evaluate")
    assert json.loads(result.stdout)["test_samples"] == 101  # the synthetic set, generated in memory
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_a_stale_world_size_without_peers_ends_with_one_line(tmp_path, data_dir):
    env = cpu_env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    result = run(tiny_args(data_dir, tmp_path / "run", "--collective-timeout", "5"), env=env, check=False,
                 in_process=False, timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("dist-alexnet: error:")]
    assert len(lines) == 1 and "did not all join within --collective-timeout 5 s" in lines[0], result.stderr[-2000:]
