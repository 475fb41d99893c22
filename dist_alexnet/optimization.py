"""How the weights are updated: the optimizer the trainer and the benchmark share."""

from __future__ import annotations

import torch


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam over all of the model's parameters at --lr (the reference run's optimizer)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    # fused: Adam for all parameters in one kernel; it also spares fp16 a host-side overflow check
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, **({"fused": True} if on_cuda else {}))
