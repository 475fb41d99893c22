"""How the weights are updated: the optimizer, the learning-rate schedule and the moving average of the
weights, shared by the trainer and the benchmark.

The defaults are the reference run: Adam at a constant learning rate, no warmup, no weight decay. The
schedule is a pure function of the number of optimizer steps actually applied (TrainState.applied_steps),
so a resumed run continues it exactly, and a step that fp16's gradient scaler skipped does not advance it.
It spans --epochs, whatever --max-steps says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # the list torch's optimizers check

from dist_alexnet.config import ConfigError
from dist_alexnet.parallel import local


def make_optimizer(cfg, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """--optimizer over all of the model's parameters, starting at `lr` (the schedule sets it every step), in the
    implementation optimizer_implementation() picks for their device. A tensor-parallel plan's DTensors get a
    parameter group of their own: a fused kernel takes DTensors or plain tensors, not both."""
    params = list(model.parameters())
    planned = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    if planned and plain:
        params = [{"params": plain}, {"params": planned}]
    options = {"lr": lr, "weight_decay": cfg.weight_decay,
               optimizer_implementation(cfg, planned[0].device if planned else params[0].device): True}
    if cfg.optimizer == "sgd":
        momentum = 0.9 if cfg.momentum is None else cfg.momentum
        return torch.optim.SGD(params, momentum=momentum, nesterov=cfg.nesterov, **options)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, **options)


def optimizer_implementation(cfg, device: torch.device) -> str:
    """"fused" (one kernel over all parameters: on a CPU 10x faster than foreach for AlexNet's 58.3M, and on CUDA
    it spares fp16 a host-side overflow check) wherever torch has it for the device, else "foreach";
    --optimizer-implementation forces one."""
    if cfg.optimizer_implementation != "auto":
        return cfg.optimizer_implementation
    return "fused" if torch.device(device).type in _get_fused_kernels_supported_devices() else "foreach"


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimizer step: a warmup, then constant, cosine or onecycle, over total_steps."""
    kind: str  # constant, cosine or onecycle
    peak: float  # the learning rate after the warmup
    min_lr: float  # where cosine and onecycle end
    warmup_steps: int
    total_steps: int  # optimizer steps in --epochs

    @classmethod
    def plan(cls, cfg, peak: float, steps_per_epoch: int) -> LRSchedule:
        total = steps_per_epoch * cfg.epochs
        if cfg.warmup_epochs is not None:
            warmup = round(cfg.warmup_epochs * steps_per_epoch)
        elif cfg.warmup_steps is not None:
            warmup = cfg.warmup_steps
        else:
            warmup = round(0.3 * total) if cfg.lr_schedule == "onecycle" else 0
        if warmup >= total:
            raise ConfigError(f"the warmup ({warmup} steps) is as long as the whole run ({total} optimizer steps "
                              f"in --epochs {cfg.epochs}); shorten --warmup-steps or --warmup-epochs")
        return cls(cfg.lr_schedule, peak, cfg.min_lr, warmup, total)

    def lr(self, applied_steps: int) -> float:
        """The learning rate of the next optimizer step, after `applied_steps` applied ones."""
        step = applied_steps + 1  # 1-based: the first step of a warmup is already above 0
        if step <= self.warmup_steps:
            if self.kind == "onecycle":  # a cosine rise from peak / 25 (Smith's one-cycle policy)
                start = self.peak / 25
                return start + (self.peak - start) * (1 - math.cos(math.pi * step / self.warmup_steps)) / 2
            return self.peak * step / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.peak - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class WeightEMA:
    """An exponential moving average of a model's weights, as timm's ModelEmaV3 keeps it (without its warmup):
    after every applied optimizer step, average = decay * average + (1 - decay) * weights. The average is a
    model of its own (`average`), on every rank: each evaluates its shard of the test set with it."""

    def __init__(self, model: torch.nn.Module, average: torch.nn.Module, decay: float):
        """`average`: a model of `model`'s architecture; it starts at `model`'s weights."""
        # the same tensors after DDP wraps the model or a resume loads it (a DTensor's part on this rank)
        self.weights = [local(p) for p in model.parameters()]
        self.average = average.eval().requires_grad_(False)
        self.decay = decay
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average again at the weights as they are now."""
        torch._foreach_copy_([local(p) for p in self.average.parameters()], self.weights)

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_([local(p) for p in self.average.parameters()], self.weights, 1 - self.decay)
