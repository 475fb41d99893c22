"""Checkpoints and resume: bit-exact resume (1 and 2 processes) with negative controls, resume on another
world size, kill -9 while saving, preemption signals, requeue, corrupt and malicious checkpoint files."""

import json
import os
import pickle
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from dist_alexnet.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from dist_alexnet.preemption import requeue_command
from tests.helpers import (RECIPE, TRAIN_SAMPLES, Lines, cpu_env, fake_scontrol, final_weights, max_difference, metrics,
                           per_step_losses, run, samples_per_step, scalars, start, steps_per_epoch, tiny_args,
                           train_tiny, truncate, worker_pids)


def resume_with(run_dir, data_dir, processes, edit=None):
    """Copy an interrupted run, optionally tamper with its checkpoint, resume it to the end."""
    if edit:
        edit(list_checkpoints(run_dir)[-1])
    train_tiny(run_dir, data_dir, *RECIPE, processes=processes)
    return run_dir


def forget_position(checkpoint: Path):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["position"] = 0
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def forget_rng(checkpoint: Path):
    states = torch.load(checkpoint / "rng_states.pt", weights_only=True)
    torch.save([{"cpu": torch.Generator().manual_seed(12345 + i).get_state()} for i in range(len(states))],
               checkpoint / "rng_states.pt")


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, data_dir, processes):
    stop = steps_per_epoch(processes) + 7  # mid-epoch, in the second epoch
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_tiny(whole, data_dir, *RECIPE, processes=processes)
    train_tiny(cut, data_dir, *RECIPE, "--max-steps", str(stop), processes=processes)
    assert list_checkpoints(cut)[-1].name == f"step_{stop:06d}"
    # Negative controls: without the data position or the RNG state the runs must differ (the position's role is
    # the same on any number of processes: checked on one; each rank's own RNG stream on both).
    controls = {"no_position": forget_position, "no_rng": forget_rng} if processes == 1 else {"no_rng": forget_rng}
    copies = {name: shutil.copytree(cut, tmp_path / name, symlinks=True) for name in controls}

    result = resume_with(cut, data_dir, processes)
    assert per_step_losses(result) == per_step_losses(whole)  # every step's loss, exactly
    assert scalars(result, "train/lr") == scalars(whole, "train/lr")
    assert max_difference(final_weights(result), final_weights(whole)) == 0.0
    for name, tensor in final_weights(whole).items():
        assert torch.equal(tensor, final_weights(result)[name])
    assert max_difference(final_weights(result, "ema"), final_weights(whole, "ema")) == 0.0

    for name, edit in controls.items():
        other = resume_with(copies[name], data_dir, processes, edit)
        assert max_difference(final_weights(other), final_weights(whole)) > 0, name
        assert per_step_losses(other) != per_step_losses(whole), name


# A preemption at a boundary step, made exact by DIST_ALEXNET_SIGNAL (a real SIGUSR1 before that step): the
# epoch's last step (its evaluation not yet run), a step inside an accumulation group, the run's last step.
SPE = steps_per_epoch()
PREEMPTION_CASES = {
    "epoch_end": ([], SPE, (SPE, 0, TRAIN_SAMPLES)),
    "accumulating": (["--grad-accum", "2"], SPE // 4, (SPE // 4, 0, SPE // 4 * 64)),  # 2 x 32 samples per step
    "run_end": ([], 2 * SPE, None),  # only the evaluation was left: it finishes instead
}


@pytest.mark.parametrize("case", [case if case == "epoch_end" else pytest.param(case, marks=pytest.mark.slow)
                                  for case in PREEMPTION_CASES])
def test_a_preemption_at_a_boundary_step_resumes_as_if_uninterrupted(tmp_path, data_dir, case):
    extra, step, saved = PREEMPTION_CASES[case]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_tiny(whole, data_dir, *RECIPE, *extra)
    stopped = train_tiny(cut, data_dir, *RECIPE, *extra, env=cpu_env(DIST_ALEXNET_SIGNAL=f"0:{step}"))
    if saved is None:
        assert "got SIGUSR1 at the last step: finishing the run" in stopped.stdout, stopped.stdout
        assert "preempted" not in stopped.stdout
    else:
        assert f"preempted at step {step} by SIGUSR1" in stopped.stdout, stopped.stdout
        state = json.loads((list_checkpoints(cut)[-1] / "trainer_state.json").read_text())
        assert (state["step"], state["epoch"], state["position"]) == saved
        resumed = train_tiny(cut, data_dir, *RECIPE, *extra)
        assert f"resumed from {cut / 'checkpoints' / f'step_{step:06d}'} at step {step}" in resumed.stdout
        if case == "epoch_end":  # the resumed run evaluates the epoch first
            assert f"step {step} (end of epoch 1) | test loss" in resumed.stdout, resumed.stdout
    assert per_step_losses(cut) == per_step_losses(whole)
    assert scalars(cut, "test/acc") == scalars(whole, "test/acc")  # every epoch evaluated once, as uninterrupted
    assert max_difference(final_weights(cut), final_weights(whole)) == 0.0
    assert {k: metrics(cut)[k] for k in ("test_acc", "epochs", "steps")} == \
        {k: metrics(whole)[k] for k in ("test_acc", "epochs", "steps")}


def samples_seen(log_dir: Path, epoch: int) -> list[int]:
    return [index for (e, _), indices in samples_per_step(log_dir).items() if e == epoch for index in indices]


@pytest.mark.slow
@pytest.mark.parametrize("before, after, stop", [(2, 1, 16 + 5), (1, 2, 32 + 8)])
def test_resume_on_another_world_size_sees_each_sample_once(tmp_path, data_dir, before, after, stop):
    run_dir, log_dir = tmp_path / "run", tmp_path / "samples"
    env = cpu_env(DIST_ALEXNET_SAMPLE_LOG=log_dir)
    train_tiny(run_dir, data_dir, "--epochs", "2", "--max-steps", str(stop), processes=before, env=env)
    result = train_tiny(run_dir, data_dir, "--epochs", "2", processes=after, env=env)
    assert "resumed from" in result.stdout and f"step {stop}" in result.stdout
    # Epoch index 1 was split between the two world sizes: every sample exactly once.
    assert sorted(samples_seen(log_dir, 1)) == list(range(TRAIN_SAMPLES))
    assert sorted(samples_seen(log_dir, 0)) == list(range(TRAIN_SAMPLES))
    state = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["world_size"] == after


@pytest.mark.slow
def test_kill_9_while_checkpointing_always_resumes_from_a_committed_checkpoint(tmp_path, data_dir):
    """Checkpoint every step, kill -9 at random moments and in the middle of writing a checkpoint, restart: never
    a crash on a partial checkpoint, and each restart resumes from the newest committed one."""
    run_dir = tmp_path / "run"
    args = tiny_args(data_dir, run_dir, "--epochs", "3", "--checkpoint-every", "1", "--log-every", "1",
                     "--keep-checkpoints", "2")
    rng = random.Random(0)
    trials, mid_write, recovered = 4, 0, 0
    for trial in range(trials):
        committed = [p.name for p in list_checkpoints(run_dir)]
        proc = start(args)
        # wait until this process has saved at least once, then kill it: at a random moment (even trials), or as
        # soon as it is writing its next checkpoint (odd trials)
        deadline = time.time() + 120
        while time.time() < deadline and [p.name for p in list_checkpoints(run_dir)] == committed:
            time.sleep(0.02)
        if trial % 2:
            while time.time() < deadline and not list((run_dir / "checkpoints").glob(".tmp-*")):
                time.sleep(0.002)
        else:
            time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=60)[0]
        assert "Traceback" not in out, out[-3000:]
        if committed:  # it resumed from the newest checkpoint that existed when it started
            assert f"resumed from {run_dir / 'checkpoints' / committed[-1]}" in out, out[-3000:]
            recovered += 1
        mid_write += bool(list((run_dir / "checkpoints").glob(".tmp-*")))
    final = run(args, timeout=300)
    assert "resumed from" in final.stdout
    assert metrics(run_dir)["steps"] == 3 * steps_per_epoch()
    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert steps == list(range(1, 3 * steps_per_epoch() + 1))  # no step lost or repeated in TensorBoard
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert mid_write >= 1  # the interesting case happened at least once
    print(f"kill -9 trials: {trials}, recovered: {recovered}/{trials - 1} restarts + final, "
          f"killed mid-write: {mid_write}")


@pytest.mark.slow
# (SIGTERM to a worker: test_hardening and the Slurm tests; SIGHUP: a closed terminal or a dropped ssh session)
@pytest.mark.parametrize("sig, target", [(signal.SIGUSR1, 1), (signal.SIGHUP, 0), (signal.SIGUSR1, "launcher")])
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, data_dir, sig, target):
    run_dir = tmp_path / "run"
    args = tiny_args(data_dir, run_dir, "--epochs", "20", "--log-every", "1")
    # torchrun (inside accelerate launch) forwards SIGTERM/SIGINT to the workers, and SIGUSR1 when told to.
    proc = start(args, processes=2, env=cpu_env(PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"))
    output = Lines(proc)
    try:
        output.wait_for("step 20/")
        os.kill(proc.pid if target == "launcher" else worker_pids(proc.pid)[target], sig)
        output.finish(timeout=120)
        out = output.text()
    finally:
        proc.kill()
    # The launcher itself reports the signal it got as a failure; signalled workers exit cleanly.
    assert proc.returncode == 0 or target == "launcher", out[-3000:]
    assert "Traceback" not in out.split("preempted at step")[0], out[-3000:]
    assert out.count("preempted at step") == 1, out[-3000:]
    stopped = int(out.split("preempted at step ")[1].split()[0])
    assert list_checkpoints(run_dir)[-1].name == f"step_{stopped:06d}"
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    assert state["step"] == stopped and len(torch.load(list_checkpoints(run_dir)[-1] / "rng_states.pt",
                                                       weights_only=True)) == 2
    if target != 1:
        return  # a resume after a signal: once is enough (test_a_preemption_at_a_boundary_step_... for more)
    # the resumed run continues from there and finishes with the right step count
    result = train_tiny(run_dir, data_dir, "--epochs", "20", "--max-steps", str(stopped + 5), processes=2)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:06d}'} at step {stopped}" in result.stdout
    assert metrics(run_dir)["steps"] == stopped + 5


@pytest.mark.slow
def test_preemption_requeues_the_slurm_job(tmp_path, data_dir):
    """Inside a Slurm job the trainer calls `scontrol requeue <job>` after its checkpoint."""
    env, record = fake_scontrol(tmp_path, "4242")
    proc = start(tiny_args(data_dir, tmp_path / "run", "--epochs", "20", "--log-every", "1"), env=env)
    output = Lines(proc)
    try:
        output.wait_for("step 5/")
        proc.send_signal(signal.SIGUSR1)
        output.finish(timeout=120)
        out = output.text()
    finally:
        proc.kill()
    assert proc.returncode == 0 and "preempted at step" in out
    assert record.read_text().split() == ["requeue", "4242"]


def test_requeue_command_for_plain_and_array_jobs():
    assert requeue_command({"SLURM_JOB_ID": "77"}) == ["scontrol", "requeue", "77"]
    assert requeue_command({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == \
        ["scontrol", "requeue", "70_3"]
    assert requeue_command({}) is None


class CreatesAFile:
    """A pickle payload: unpickling it with plain pickle would create a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def tampered_copy(trained_run, tmp_path) -> Path:
    """A copy of the shared run (two checkpoints, steps 32 and 64) to tamper with."""
    return shutil.copytree(trained_run, tmp_path / "run", symlinks=True)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, trained_run, data_dir):
    run_dir = tampered_copy(trained_run, tmp_path)
    evil = tmp_path / "pwned"
    newest = list_checkpoints(run_dir)[-1]
    with open(newest / "optimizer.pt", "wb") as f:
        pickle.dump({"state": CreatesAFile(evil)}, f)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(newest)
    result = train_tiny(run_dir, data_dir, "--epochs", "3", "--resume", str(newest), check=False)
    assert result.returncode == 2 and "optimizer.pt" in result.stderr and "Traceback" not in result.stderr
    assert not evil.exists()


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt"])
def test_truncated_checkpoint_is_named_and_auto_falls_back(tmp_path, trained_run, data_dir, file):
    run_dir = tampered_copy(trained_run, tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    truncate(newest / file)

    explicit = train_tiny(run_dir, data_dir, "--epochs", "3", "--resume", str(newest), check=False)
    assert explicit.returncode == 2, explicit.stderr
    assert explicit.stderr.count("\n") == 1 and str(newest / file) in explicit.stderr
    assert "truncated or corrupt" in explicit.stderr or "corrupt" in explicit.stderr

    auto = train_tiny(run_dir, data_dir, "--epochs", "3")
    assert f"skipping checkpoint {newest}" in auto.stdout
    assert "at step 32" in auto.stdout and metrics(run_dir)["steps"] == 96


def test_half_written_checkpoint_is_ignored_with_a_warning(tmp_path, trained_run, data_dir):
    run_dir = tampered_copy(trained_run, tmp_path)
    partial = run_dir / "checkpoints" / ".tmp-step_000070-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    result = train_tiny(run_dir, data_dir, "--epochs", "3")
    assert f"ignoring half-written checkpoint {partial}" in result.stdout
    assert "resumed from" in result.stdout and "at step 64" in result.stdout
    assert not partial.exists()


def test_checkpoint_from_another_model_is_refused(tmp_path, trained_run, data_dir):
    run_dir = tampered_copy(trained_run, tmp_path)
    result = train_tiny(run_dir, data_dir, "--epochs", "3", "--model-width", "0.25", check=False)
    assert result.returncode == 2
    assert "different model or data set: model_width 0.125 (this run: 0.25)" in result.stderr
def test_retention_keeps_the_newest_k_and_the_best(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, data_dir, "--epochs", "3", "--checkpoint-every", "10", "--keep-checkpoints", "2")
    kept = [p.name for p in list_checkpoints(run_dir)]
    best = (run_dir / "checkpoints" / "best").resolve()
    assert kept[-2:] == ["step_000090", "step_000096"]  # the newest two...
    assert best.name in ("step_000032", "step_000064", "step_000096") and best.name in kept  # ...plus the best
    assert len(kept) == (2 if best.name == "step_000096" else 3)
    state = json.loads((best / "trainer_state.json").read_text())
    accuracies = [s for _, s in scalars(run_dir, "test/acc")]
    assert state["test_acc"] == state["best_test_acc"] and abs(state["test_acc"] - max(accuracies)) < 1e-6
