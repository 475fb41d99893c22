"""The learning-rate range test's arithmetic: the learning rate of each step, the smoothed loss, the suggestion.

No torch: the command line reads the sweep's defaults and checks its options before lr-find's run imports
torch and accelerate (dist_alexnet/lr_find.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_alexnet.errors import ConfigError

SKIP_START = 10  # the first steps' losses say more about the initialization than about the learning rate


@dataclass(frozen=True)
class Sweep:
    start_lr: float = 1e-6
    end_lr: float = 1.0
    num_steps: int = 300
    smoothing: float = 0.9  # beta of the moving average: about 1 / (1 - beta) = 10 steps of memory
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this times its best (Lightning's 4)

    def validate(self) -> Sweep:
        problems = []
        if not (0 < self.start_lr < self.end_lr and math.isfinite(self.end_lr)):
            problems.append(f"--start-lr and --end-lr must be positive with --start-lr below --end-lr "
                            f"(got {self.start_lr:g} and {self.end_lr:g})")
        if self.num_steps < 2 * SKIP_START:
            problems.append(f"--num-steps must be >= {2 * SKIP_START} (got {self.num_steps}); a few hundred is usual")
        if not 0 <= self.smoothing < 1:
            problems.append(f"--smoothing must be in [0, 1) (got {self.smoothing:g})")
        if not self.diverge_factor > 1:
            problems.append(f"--diverge-factor must be above 1 (got {self.diverge_factor:g})")
        if problems:
            raise ConfigError("\n".join(problems))
        return self

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): exponential from start_lr to end_lr."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.num_steps - 1))


def smooth(losses: list[float], beta: float) -> list[float]:
    """The bias-corrected exponential moving average of `losses`."""
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return smoothed


def suggest(lrs: list[float], smoothed: list[float], sweep: Sweep) -> dict:
    """The suggested learning rate (the smoothed loss's minimum / 10, within the swept range), the steepest
    descent's learning rate, and a note when the curve does not support a suggestion well."""
    skip = min(SKIP_START, len(lrs) - 1)
    best = min(range(skip, len(lrs)), key=lambda i: smoothed[i])
    # steepest descent of the smoothed loss over log(lr), before the minimum (after it the loss rises)
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1]) for i in range(skip, best)]
    steepest = lrs[skip + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[best]
    suggested, note = lrs[best] / 10, None
    if suggested < sweep.start_lr:
        suggested = sweep.start_lr
        note = "the loss was lowest within a decade of --start-lr: lower --start-lr and run again"
    elif best == len(lrs) - 1 and len(lrs) == sweep.num_steps:
        note = "the loss was still falling at --end-lr: raise --end-lr and run again"
    elif smoothed[best] > 0.98 * smoothed[skip]:
        note = "the smoothed loss hardly fell during the sweep: more --num-steps or a wider range may show more"
    return {"suggested_lr": suggested, "min_loss_lr": lrs[best], "min_smoothed_loss": smoothed[best],
            "steepest_lr": steepest, "note": note}
