"""The training step and the exact evaluation: what the trainer, the benchmark and `evaluate` run on a model."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from dist_alexnet.distributed import phase
from dist_alexnet.inputs import to_model_input
from dist_alexnet.parallel import DataParallel
from dist_alexnet.stats import StepStats


@dataclass
class StepEnd:
    """What the micro-batch that completed an optimizer step found out; every rank has the same."""
    nonfinite_ranks: list[int]  # ranks whose loss was NaN/inf in this step: then the update was not applied
    stop_requested: bool  # some rank got a preemption signal: every rank stops after this step
    checkpoint_due: bool = False  # rank 0 found a checkpoint due by time (--checkpoint-minutes)
    grad_norm: torch.Tensor | None = None  # when asked for or clipping: the gradient's L2 norm before clipping
    applied: bool = False  # the optimizer changed the weights (not when fp16's gradient scaler skipped the step)


@dataclass(frozen=True)
class StepAsks:
    """What the loop asks of one step, besides its batch."""
    stop_requested: bool = False  # this rank got a preemption signal
    checkpoint_due: bool = False  # this rank's clock says a checkpoint is due (--checkpoint-minutes)
    measure_grad_norm: bool = False  # a log point: measure the gradient's norm


@dataclass(frozen=True)
class TrainStep:
    """The training step over the run's prepared model and optimizer, built once at set-up; the trainer and the
    benchmark call it with each micro-batch."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    parallel: DataParallel  # how the model is spread over the ranks (parallel.py)
    stats: StepStats
    label_smoothing: float = 0.0
    grad_clip: float | None = None

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, asks: StepAsks = StepAsks()) -> StepEnd | None:
        """One micro-batch: forward, backward; on the micro-batch that completes an optimizer step, the
        parallelism's gradient exchange, the stop check, the gradient's norm (clipped to grad_clip), then (unless
        some rank's loss was not finite) the update. Returns the StepEnd of a completed step, None between the
        micro-batches of a gradient-accumulation group."""
        accelerator, end = self.accelerator, None
        started = time.perf_counter()
        with accelerator.accumulate(self.model), phase("a training step (forward, backward, their collectives)"):
            logits = self.model(inputs)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            self.stats.local_seconds += time.perf_counter() - started  # (host time: launch time on CUDA)
            self.stats.add(loss, logits, labels)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                with phase(f"the {self.parallel.name} gradient exchange after backward"):
                    self.parallel.after_backward(self.model)
                end = agree_on_step_end(accelerator, self.stats.take_nonfinite(), asks.stop_requested,
                                        asks.checkpoint_due)
                if self.grad_clip is not None:
                    end.grad_norm = self.parallel.clip_gradients(self.model, self.grad_clip)
                elif asks.measure_grad_norm:
                    end.grad_norm = self.parallel.gradient_norm(self.model)
            if end is None or not end.nonfinite_ranks:
                self.optimizer.step()  # between the micro-batches of a group, Accelerate's optimizer does nothing
                self.optimizer.zero_grad(set_to_none=True)
        if end is not None:
            end.applied = not end.nonfinite_ranks and not accelerator.optimizer_step_was_skipped
        return end


@phase("the per-step stop check")
def agree_on_step_end(accelerator: Accelerator, nonfinite: torch.Tensor, stop_requested: bool,
                      checkpoint_due: bool = False) -> StepEnd:
    """The stop check: each rank's [non-finite losses in this step, stop requested, checkpoint due by its
    clock] gathered to every rank; rank 0's clock is the one that counts. It is the training loop's one
    host-device sync per optimizer step."""
    local = torch.stack([nonfinite.float(), torch.full_like(nonfinite, float(stop_requested)),
                         torch.full_like(nonfinite, float(checkpoint_due))])
    flags = accelerator.gather(local.reshape(1, 3)).tolist()
    return StepEnd(nonfinite_ranks=[rank for rank, (bad, _, _) in enumerate(flags) if bad],
                   stop_requested=any(stop for _, stop, _ in flags), checkpoint_due=bool(flags[0][2]))


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, image_size: int) -> dict:
    """Exact evaluation: every sample counted once whatever the world size. gather_for_metrics drops
    the duplicates Accelerate pads the last batch with, so counts equal the test-set size."""
    model.eval()
    losses, predictions, labels, indices = [], [], [], []
    for images, targets, index in loader:
        logits = model(to_model_input(images, image_size)).float()
        loss = F.cross_entropy(logits, targets, reduction="none")
        loss, pred, targets, index = accelerator.gather_for_metrics((loss, logits.argmax(1), targets, index))
        losses.append(loss), predictions.append(pred), labels.append(targets), indices.append(index)
    model.train()
    losses, predictions, labels = torch.cat(losses), torch.cat(predictions).cpu(), torch.cat(labels).cpu()
    correct = int((predictions == labels).sum())
    confusion = torch.bincount(labels * 10 + predictions, minlength=100).view(10, 10)  # rows: true class
    return {
        "test_loss": float(losses.mean()),
        "test_acc": correct / len(labels),
        "test_correct": correct,
        "test_samples": len(labels),
        "confusion_matrix": confusion,
        "per_class_acc": (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist(),
        "predictions": predictions,
        "labels": labels,
        "indices": torch.cat(indices).cpu(),  # position of each sample in the test split
    }
