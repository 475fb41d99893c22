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
import time
from pathlib import Path

import torch


def _for_rank(env, name: str, rank: int, kind: type):
    """The value of a hook set as RANK:VALUE, when it names this rank; else None."""
    if not env.get(name):
        return None
    target_rank, value = env[name].split(":")
    return kind(value) if int(target_rank) == rank else None


class DebugHooks:
    """The hooks of one rank, for the life of a run (`with DebugHooks(rank, model) as hooks:`). The training loop
    tells it where it is (before_micro_batch, after_step); the NaN and the slow rank act through hooks on the
    model, registered only when their variable names this rank, so the training step itself carries nothing of
    them."""

    def __init__(self, rank: int, model: torch.nn.Module, env=os.environ):
        self.rank = rank
        self.step = 0  # the optimizer step of the micro-batch in progress
        self.nan_step = _for_rank(env, "DIST_ALEXNET_INJECT_NAN", rank, int)
        self.perturb_step = _for_rank(env, "DIST_ALEXNET_PERTURB", rank, int)
        self.slow_seconds = _for_rank(env, "DIST_ALEXNET_SLOW_RANK", rank, float)
        self.signal_step = _for_rank(env, "DIST_ALEXNET_SIGNAL", rank, int)
        self.sample_log_dir = env.get("DIST_ALEXNET_SAMPLE_LOG")
        self.sample_log = None
        self.model = model
        self.installed = []  # the model hooks' handles, removed on exit

    def __enter__(self) -> DebugHooks:
        if self.sample_log_dir:
            Path(self.sample_log_dir).mkdir(parents=True, exist_ok=True)
            self.sample_log = open(Path(self.sample_log_dir) / f"rank{self.rank}-{os.getpid()}.txt", "a", buffering=1)
        if self.slow_seconds:
            self.installed.append(self.model.register_forward_pre_hook(self._slow_down))
        if self.nan_step is not None:
            self.installed.append(self.model.register_forward_hook(self._poison))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.installed:
            handle.remove()
        if self.sample_log:
            self.sample_log.close()

    def before_micro_batch(self, epoch: int, step: int, batch) -> None:
        """A micro-batch of optimizer step `step` is next: log its samples; SIGUSR1 to this process before the
        step's first micro-batch, when DIST_ALEXNET_SIGNAL names it (once)."""
        self.step = step
        if self.sample_log:
            self.sample_log.write("".join(f"{epoch} {step} {i}\n" for i in batch[2].tolist()))
        if self.signal_step == step:
            self.signal_step = None
            signal.raise_signal(signal.SIGUSR1)

    def after_step(self, step: int, params) -> None:
        """After step `step`: nudge this rank's first replicated weight, when DIST_ALEXNET_PERTURB names it."""
        if self.perturb_step == step:
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-3

    def _slow_down(self, module, args) -> None:
        if module.training:
            time.sleep(self.slow_seconds)

    def _poison(self, module, args, logits: torch.Tensor):
        """NaN logits, hence a NaN loss and NaN gradients, in the training forwards of the chosen step."""
        return logits * float("nan") if module.training and self.step == self.nan_step else None
