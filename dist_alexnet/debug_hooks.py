"""Debugging and test hooks, all read from environment variables, all off unless set:

  DIST_ALEXNET_SAMPLE_LOG=DIR     every rank appends "epoch step sample-index" lines for each training sample
                                  it consumes (step: the optimizer step it is for) to DIR/rank<R>-<pid>.txt,
                                  which proves that a resume neither repeats nor skips samples
  DIST_ALEXNET_INJECT_NAN=R:S     rank R's loss is NaN at optimizer step S (tests the non-finite-loss stop)
  DIST_ALEXNET_PERTURB=R:S        after optimizer step S, rank R adds 1e-3 to one of its replicated weights
                                  (tests the ranks' consistency check)
  DIST_ALEXNET_SLOW_RANK=R:SEC    rank R sleeps SEC seconds before each micro-batch's forward (tests the
                                  straggler warning)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class DebugHooks:
    """The hooks of one rank, for the life of a run (`with DebugHooks(rank) as hooks:`)."""

    def __init__(self, rank: int, env=os.environ):
        self.rank = rank
        self.nan_step = None
        if env.get("DIST_ALEXNET_INJECT_NAN"):
            target_rank, target_step = (int(x) for x in env["DIST_ALEXNET_INJECT_NAN"].split(":"))
            self.nan_step = target_step if target_rank == rank else None
        self.perturb_step = self.slow_seconds = None
        if env.get("DIST_ALEXNET_PERTURB"):
            target_rank, target_step = (int(x) for x in env["DIST_ALEXNET_PERTURB"].split(":"))
            self.perturb_step = target_step if target_rank == rank else None
        if env.get("DIST_ALEXNET_SLOW_RANK"):
            target_rank, seconds = env["DIST_ALEXNET_SLOW_RANK"].split(":")
            self.slow_seconds = float(seconds) if int(target_rank) == rank else None
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
