"""Where a training run is: the TrainState a checkpoint saves and a resume restores, and each rank's RNG state.

A checkpoint is this state plus the weights, the optimizer's state and every rank's RNG state: save and
resume both go through TrainState.state_dict() / load_state_dict(), so whatever is added here is saved
and restored alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from dist_alexnet.device import use_cuda


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken so far
    applied_steps: int = 0  # of those, the ones the optimizer applied (fp16 may skip some): the LR schedule's clock
    epoch: int = 0  # the epoch being trained, from 0 (epochs completed)
    position: int = 0  # samples of this epoch's global order already trained, all ranks together
    best_test_acc: float | None = None  # best test accuracy of any evaluation so far
    # global [loss x samples, correct, samples] of the steps since the last log point, so that a resumed run's
    # first point covers the same steps as the uninterrupted run's
    pending_train_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    last_train_loss: float | None = None  # the training loss at the latest log point (for the final metrics)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        # checkpoints of 0.1 have neither: every step was applied, and the last loss is in the event files
        saved = {"applied_steps": saved["step"], "last_train_loss": None, **saved}
        for f in dataclasses.fields(self):
            setattr(self, f.name, saved[f.name])

    def start_next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0

    def record_test_acc(self, acc: float) -> None:
        self.best_test_acc = acc if self.best_test_acc is None else max(self.best_test_acc, acc)


def rng_state() -> dict:
    """This rank's random state: dropout is the only consumer (data order and loaders have their own)."""
    state = {"cpu": torch.get_rng_state()}
    if use_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and use_cuda():
        torch.cuda.set_rng_state(state["cuda"])
