"""How a run's samples are shared out (BatchPlan) and when things happen in it (Schedule), counted in
optimizer steps and in samples of the epoch.

BatchPlan is the one place that turns --batch-size / --global-batch-size, --grad-accum and the number of
processes into batch sizes. The training loop and the monitor ask the same Schedule whether a step is
logged, whether a checkpoint is due and whether the epoch is over, so each of these is decided in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_alexnet.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    per_process: int  # samples per process per micro-batch
    processes: int
    micro_batches: int  # micro-batches per optimizer step (--grad-accum)

    @classmethod
    def of(cls, cfg, processes: int) -> BatchPlan:
        """--batch-size per process, or --global-batch-size shared out over the processes and micro-batches."""
        shares = processes * cfg.grad_accum
        if cfg.global_batch_size is None:
            return cls(cfg.batch_size, processes, cfg.grad_accum)
        if cfg.global_batch_size % shares:
            below = cfg.global_batch_size // shares * shares
            fits = [n for n in range(1, 65) if cfg.global_batch_size % (n * cfg.grad_accum) == 0]
            elsewhere = (f", or run on {', '.join(map(str, fits))} process(es)" if fits else
                         f" (with --grad-accum {cfg.grad_accum} it fits no number of processes)")
            raise ConfigError(f"--global-batch-size {cfg.global_batch_size} does not divide by {processes} "
                              f"process(es) x --grad-accum {cfg.grad_accum} = {shares}: use a multiple of {shares} "
                              f"(e.g. {max(below, shares)} or {below + shares}){elsewhere}")
        return cls(cfg.global_batch_size // shares, processes, cfg.grad_accum)

    @property
    def micro_samples(self) -> int:
        """Samples per micro-batch, all processes together."""
        return self.per_process * self.processes

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all processes and micro-batches together."""
        return self.micro_samples * self.micro_batches

    def steps_per_epoch(self, train_samples: int) -> int:
        """Whole optimizer steps in an epoch (inputs.EpochOrder leaves out the rest)."""
        return train_samples // self.global_batch

    def lr(self, cfg) -> float:
        """--lr, scaled by --lr-scaling from --lr-reference-batch to this global batch."""
        ratio = self.global_batch / cfg.lr_reference_batch
        return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]

    def check_fits(self, cfg, train_samples: int) -> None:
        """One optimizer step's samples must not outnumber the training split (an epoch would have no step)."""
        if train_samples >= self.global_batch:
            return
        given = (f"--global-batch-size {cfg.global_batch_size}" if cfg.global_batch_size
                 else f"--batch-size {cfg.batch_size} x {self.processes} process(es)"
                      + (f" x --grad-accum {cfg.grad_accum}" if cfg.grad_accum > 1 else "") + f" = {self.global_batch}")
        raise ConfigError(f"{given} is larger than the {train_samples} training samples; lower "
                          f"{'--global-batch-size' if cfg.global_batch_size else '--batch-size'}")


@dataclass(frozen=True)
class Schedule:
    train_samples: int  # samples in the training split
    batch: BatchPlan
    total_steps: int  # the step this launch stops after: the end of the last epoch, or --max-steps
    log_every: int
    checkpoint_every: int | None
    checkpoint_minutes: float | None = None

    @classmethod
    def plan(cls, cfg, train_samples: int, batch: BatchPlan, state) -> Schedule:
        """The schedule of a run with `cfg` that starts at `state` (a fresh one, or where a checkpoint left off,
        possibly with another number of processes: the rest of that epoch is counted in this run's steps)."""
        step_samples = batch.global_batch  # an epoch makes whole optimizer steps only
        epochs_left = cfg.epochs - state.epoch
        total = state.step
        if epochs_left > 0:
            total += (train_samples - state.position) // step_samples
            total += train_samples // step_samples * (epochs_left - 1)
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        check_profile_window(cfg.profile_steps, total, state.step)
        return cls(train_samples, batch, total, cfg.log_every, cfg.checkpoint_every, cfg.checkpoint_minutes)

    @property
    def steps_per_epoch(self) -> int:
        return self.batch.steps_per_epoch(self.train_samples)

    def epoch_over(self, position: int) -> bool:
        """No whole optimizer step is left in the epoch after `position` samples."""
        return self.train_samples - position < self.batch.global_batch

    def is_last(self, step: int) -> bool:
        return step >= self.total_steps

    def should_log(self, step: int) -> bool:
        """A log point (TensorBoard scalars, a log line): every --log-every steps and at the last step."""
        return step % self.log_every == 0 or self.is_last(step)

    def checkpoint_due(self, seconds_since_checkpoint: float) -> bool:
        """--checkpoint-minutes have passed since the last checkpoint (asked on rank 0's clock: every rank
        learns its answer in the step's stop check)."""
        return bool(self.checkpoint_minutes) and seconds_since_checkpoint >= 60 * self.checkpoint_minutes

    def should_checkpoint(self, step: int, position: int, time_due: bool = False) -> bool:
        """A checkpoint inside an epoch: every --checkpoint-every steps, and when rank 0 found one due by time.
        The end of an epoch and the end of the run have their own checkpoint, after their evaluation."""
        by_steps = bool(self.checkpoint_every) and step % self.checkpoint_every == 0
        return (by_steps or time_due) and not self.epoch_over(position) and not self.is_last(step)


def check_profile_window(spec: str | None, total_steps: int, start_step: int) -> None:
    """--profile-steps A:B must end by the run's last step: a profile still open when the process ends crashes it
    (torch.profiler at interpreter exit). A window a resumed run has already passed is left alone (its earlier
    launch profiled it)."""
    if spec is None:
        return
    first, last = (int(part) for part in spec.split(":"))  # validated by TrainConfig
    if last > total_steps and start_step < last:
        raise ConfigError(f"--profile-steps {spec} ends after the run's last step, {total_steps}; profile steps up "
                          f"to {total_steps} (e.g. --profile-steps {min(first, total_steps)}:{total_steps})")
