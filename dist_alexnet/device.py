"""Which device a process computes on: the one answer every module asks for."""

from __future__ import annotations

import os


def use_cuda() -> bool:
    """CUDA when this machine has a usable GPU, unless ACCELERATE_USE_CPU asks for the CPU (as Accelerate honours
    it: `accelerate launch --cpu`, or the variable exported)."""
    import torch  # here, not at the top: TrainConfig asks while the options are parsed, before torch is needed

    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


def default_device():
    """torch.device("cuda") or torch.device("cpu"), as use_cuda() says."""
    import torch  # as in use_cuda: this module is imported before torch is needed

    return torch.device("cuda" if use_cuda() else "cpu")
