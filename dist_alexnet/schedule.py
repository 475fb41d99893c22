"""When things happen in a run, counted in optimizer steps and in samples of the epoch.

The training loop and the monitor ask the same Schedule whether a step is logged, whether a checkpoint
is due and whether the epoch is over, so each of these is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_alexnet.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    train_samples: int  # samples in the training split
    micro_samples: int  # samples per micro-batch, all processes together
    step_samples: int  # samples per optimizer step: micro-batches of all processes and --grad-accum
    total_steps: int  # the step this launch stops after: the end of the last epoch, or --max-steps
    log_every: int
    checkpoint_every: int | None
    checkpoint_minutes: float | None = None

    @classmethod
    def plan(cls, cfg, train_samples: int, world_size: int, state) -> Schedule:
        """The schedule of a run with `cfg` that starts at `state` (a fresh one, or where a checkpoint left off,
        possibly with another number of processes: the rest of that epoch is counted in this run's steps)."""
        micro = cfg.per_process_batch(world_size) * world_size
        step_samples = micro * cfg.grad_accum
        # an epoch makes whole optimizer steps only (inputs.EpochOrder leaves out the rest)
        epochs_left = cfg.epochs - state.epoch
        total = state.step
        if epochs_left > 0:
            total += (train_samples - state.position) // step_samples
            total += train_samples // step_samples * (epochs_left - 1)
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        check_profile_window(cfg.profile_steps, total, state.step)
        return cls(train_samples, micro, step_samples, total, cfg.log_every, cfg.checkpoint_every,
                   cfg.checkpoint_minutes)

    @property
    def steps_per_epoch(self) -> int:
        return self.train_samples // self.step_samples

    def epoch_over(self, position: int) -> bool:
        """No whole optimizer step is left in the epoch after `position` samples."""
        return self.train_samples - position < self.step_samples

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
