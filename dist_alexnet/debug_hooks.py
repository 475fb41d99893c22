"""Debugging and test hooks, all read from environment variables, all off unless set:

  DIST_ALEXNET_SAMPLE_LOG=DIR     every rank appends "epoch step sample-index" lines for each training sample
                                  it consumes (step: the optimizer step it is for) to DIR/rank<R>-<pid>.txt,
                                  which proves that a resume neither repeats nor skips samples
  DIST_ALEXNET_INJECT_NAN=R:S     rank R's loss is NaN at optimizer step S (tests the non-finite-loss stop)
  DIST_ALEXNET_PERTURB=R:S        after optimizer step S, rank R adds 1e-3 to one of its replicated weights
                                  (tests the ranks' consistency check)
  DIST_ALEXNET_SLOW_RANK=R:SEC    rank R sleeps SEC seconds before each micro-batch's forward (tests the
                                  straggler warning)
  DIST_ALEXNET_SIGNAL=R:S         rank R sends itself SIGUSR1 before optimizer step S (tests a preemption at a
                                  chosen step, such as an epoch's last one, where timing a real signal cannot)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch


def _for_rank(env, name: str, rank: int, kind: type):
    """The value of a hook set as RANK:VALUE, when it names this rank; else None."""
    if not env.get(name):
        return None
    target_rank, value = env[name].split(":")
    return kind(value) if int(target_rank) == rank else None


class DebugHooks:
    """The hooks of one rank, for the life of a run (`with DebugHooks(rank) as hooks:`)."""

    def __init__(self, rank: int, env=os.environ):
        self.rank = rank
        self.nan_step = _for_rank(env, "DIST_ALEXNET_INJECT_NAN", rank, int)
        self.perturb_step = _for_rank(env, "DIST_ALEXNET_PERTURB", rank, int)
        self.slow_seconds = _for_rank(env, "DIST_ALEXNET_SLOW_RANK", rank, float)
        self.signal_step = _for_rank(env, "DIST_ALEXNET_SIGNAL", rank, int)
        self.sample_log_dir = env.get("DIST_ALEXNET_SAMPLE_LOG")
        self.sample_log = None

    def __enter__(self) -> DebugHooks:
        if self.sample_log_dir:
            Path(self.sample_log_dir).mkdir(parents=True, exist_ok=True)
            self.sample_log = open(Path(self.sample_log_dir) / f"rank{self.rank}-{os.getpid()}.txt", "a", buffering=1)
        return self

    def __exit__(self, *exc) -> None:
        if self.sample_log:
            self.sample_log.close()

    def signal_before(self, step: int) -> None:
        """Before optimizer step `step`: SIGUSR1 to this process, when DIST_ALEXNET_SIGNAL names it (once)."""
        if self.signal_step == step:
            self.signal_step = None
            signal.raise_signal(signal.SIGUSR1)

    def poisons(self, step: int) -> bool:
        """Whether this rank's loss is to be made NaN at optimizer step `step`."""
        return self.nan_step == step

    def perturb(self, step: int, params) -> None:
        """After step `step`: nudge this rank's first replicated weight, when DIST_ALEXNET_PERTURB names it."""
        if self.perturb_step == step:
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-3

    def record_samples(self, epoch: int, step: int, batch) -> None:
        if self.sample_log:
            self.sample_log.write("".join(f"{epoch} {step} {i}\n" for i in batch[2].tolist()))
