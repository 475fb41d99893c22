"""Preemption: the signals that ask a run to stop cleanly, and the Slurm requeue that continues it.

Slurm sends SIGUSR1 (as the batch scripts ask with --signal) or SIGTERM before it stops a job; a first
Ctrl-C asks for the same clean stop, a second one interrupts at once. The training loop polls the flag
once per step and every rank agrees (train_step's stop check) to stop at the same step, save one
checkpoint and exit; inside a Slurm job rank 0 then requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from dist_alexnet.errors import Interrupted

# SIGHUP: the terminal closed or the ssh session dropped; saved and stopped like the others, not killed.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class PreemptionFlag:
    """Within `with PreemptionFlag() as preemption:`, notes that SIGTERM, SIGUSR1, SIGINT or SIGHUP arrived
    (preemption.received: the signal's name); the previous handlers come back on exit."""

    active: PreemptionFlag | None = None  # the flag of the command running in this process

    def __init__(self):
        self.received: str | None = None
        self.doing: str | None = None  # set-up work a signal interrupts at once (stop_at_once_on_preemption)
        self._previous = {}
        self._outer: PreemptionFlag | None = None

    def __enter__(self) -> PreemptionFlag:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._outer, PreemptionFlag.active = PreemptionFlag.active, self
        return self

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self.doing:
            raise self.interrupted()

    def interrupted(self) -> Interrupted:
        return Interrupted(f"stopped by {self.received} while {self.doing}, before training went on: nothing new to "
                           f"save; continue with --resume auto")

    def __exit__(self, *exc) -> None:
        PreemptionFlag.active = self._outer
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_at_once_on_preemption(doing: str):
    """Within it, a preemption signal raises Interrupted at once instead of waiting for the next training step:
    for set-up work that can block far longer than a step (a tracker server that does not answer). `doing`
    names the work in the message."""
    flag = PreemptionFlag.active
    if flag is None:
        yield
        return
    flag.doing = doing
    try:
        # A signal that came earlier in the set-up does not stop it here: the trackers' start is bounded by
        # --tracker-timeout, and the first training step then saves a checkpoint and requeues, as promised.
        yield
    except Exception as err:
        if flag.received and not isinstance(err, Interrupted):  # a library wrapped it in an error of its own
            raise flag.interrupted() from None
        raise
    finally:
        flag.doing = None


def should_requeue(cfg, env=os.environ) -> bool:
    """--requeue-on-preempt, else: requeue when running inside a Slurm job."""
    return cfg.requeue_on_preempt if cfg.requeue_on_preempt is not None else "SLURM_JOB_ID" in env


def slurm_job_id(env=os.environ) -> str | None:
    """The id `scontrol requeue` needs: ARRAYJOB_TASK for an array task, else the job id."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_command(env=os.environ) -> list[str] | None:
    job = slurm_job_id(env)
    return ["scontrol", "requeue", job] if job else None


def requeue_slurm_job(log) -> bool:
    command = requeue_command()
    if command is None:
        log("not requeueing: not inside a Slurm job")
        return False
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log(f"warning: {' '.join(command)} failed ({err}); resubmit the job to continue")
        return False
    if done.returncode != 0:
        log(f"warning: {' '.join(command)} failed: {done.stderr.strip()}; resubmit the job to continue")
        return False
    log(f"requeued Slurm job {command[-1]}")
    return True
