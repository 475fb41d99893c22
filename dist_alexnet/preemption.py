"""Preemption: the signals that ask a run to stop cleanly, and the Slurm requeue that continues it.

Slurm sends SIGUSR1 (as the batch scripts ask with --signal) or SIGTERM before it stops a job; a first
Ctrl-C asks for the same clean stop, a second one interrupts at once. The training loop polls the flag
once per step and every rank agrees (train_step's stop check) to stop at the same step, save one
checkpoint and exit; inside a Slurm job rank 0 then requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    """Within `with PreemptionFlag() as preemption:`, notes that SIGTERM, SIGUSR1 or SIGINT arrived
    (preemption.received: the signal's name); the previous handlers come back on exit."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> PreemptionFlag:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
