"""What the benchmarks measure with, shared by benchmark.py, scaling_benchmark.py and scaling_model.py: the FLOPs
of a training step (PyTorch's FlopCounterMode), one process's step profile (StepProfile) and the step that
records it (ProfiledStep)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dist_alexnet.model import AlexNet


def count_flops(model_width: float, image_size: int):
    """PyTorch's FlopCounterMode over one image's forward pass and over its training step (forward and backward)
    through the trainer's AlexNet, on the "meta" device (shapes only, nothing computed): the two counters, which
    also hold the FLOPs of each module."""
    with torch.device("meta"):
        model = AlexNet(width=model_width)
        images, labels = torch.zeros(1, 1, image_size, image_size), torch.zeros(1, dtype=torch.long)
    forward, step = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        logits = model(images)
    with step:
        F.cross_entropy(model(images), labels).backward()
    del logits
    return forward, step


def training_flops(model_width: float, image_size: int) -> dict[str, int]:
    """FLOPs of one image's training step, counted by FlopCounterMode. Unlike "3 forward passes", it leaves out
    what backward does not compute: the input gradient of the first convolution."""
    forward, step = count_flops(model_width, image_size)
    return {"forward": forward.get_total_flops(), "training": step.get_total_flops()}


def backward_flops_by_layer(model_width: float, image_size: int) -> dict[str, int]:
    """FLOPs of one image's backward pass in each convolution and linear layer (by its name in the model),
    counted by FlopCounterMode: the layer's training-step FLOPs less its forward FLOPs."""
    forward, step = count_flops(model_width, image_size)
    forward_counts, step_counts = forward.get_flop_counts(), step.get_flop_counts()
    # the counters list every module with FLOPs under "AlexNet.<path>": the layers are the leaves
    # (features.N, classifier.N), and only convolutions and linear layers count FLOPs
    return {module[len("AlexNet."):]: sum(step_counts[module].values()) - sum(forward_counts[module].values())
            for module in step_counts
            if module.startswith("AlexNet.") and module.rsplit(".", 1)[-1].isdigit()}


@dataclass
class StepProfile:
    """One process's training step: forward, backward and optimizer seconds, and for every parameter the
    seconds after the start of backward at which its gradient is ready."""
    forward_s: float
    backward_s: float
    optimizer_s: float
    ready_s: dict[str, float]
    batch_size: int
    source: str
    sizes: list[tuple[str, int]]  # (name, elements) of each parameter, in the model's order


    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    def with_batch_size(self, batch_size: int) -> StepProfile:
        """The same step at another batch per process: forward and backward in proportion to the batch (a GPU at
        these batches is compute bound), the optimizer unchanged (it works on the weights)."""
        k = batch_size / self.batch_size
        return dataclasses.replace(self, forward_s=self.forward_s * k, backward_s=self.backward_s * k,
                                   ready_s={name: t * k for name, t in self.ready_s.items()}, batch_size=batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StepProfile:
        fields = {field.name: d[field.name] for field in dataclasses.fields(cls)}
        return cls(**{**fields, "sizes": [(name, int(numel)) for name, numel in fields["sizes"]]})


def parameter_sizes(model) -> list[tuple[str, int]]:
    """(name, number of elements) of each trainable parameter, in the model's order."""
    return [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]


class ProfiledStep:
    """One process's plain training step (forward, loss, backward, optimizer) that, while `recording`, notes how
    long forward, backward and the optimizer took and when each parameter's gradient was ready; `profile()` is
    the median over the recorded steps. The solo measurement's steps are these: its images/s and its profile
    come from the same steps."""
    def __init__(self, model, optimizer, inputs, labels, device, autocast=contextlib.nullcontext,
                 gradient_times: bool = True):
        self.model, self.optimizer, self.inputs, self.labels, self.autocast = model, optimizer, inputs, labels, autocast
        self.device, self.cuda = device, device.type == "cuda"
        self.recording, self.samples, self.marks = False, [], {}
        self.torch = torch
        names = {p: name for name, p in model.named_parameters()}

        def note_ready(param):
            if self.recording:
                self.marks[names[param]] = self.mark()

        if gradient_times:  # without them (a step never profiled) no hook runs in the measured steps
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(note_ready)

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def __call__(self) -> None:
        self.marks = {}
        t0 = self.mark() if self.recording else None
        with self.autocast():
            loss = F.cross_entropy(self.model(self.inputs), self.labels)
        t1 = self.mark() if self.recording else None
        loss.backward()
        t2 = self.mark() if self.recording else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.recording:
            t3 = self.mark()
            if self.cuda:
                self.torch.cuda.synchronize(self.device)
            self.samples.append((self.seconds(t0, t1), self.seconds(t1, t2), self.seconds(t2, t3),
                                 {name: self.seconds(t1, m) for name, m in self.marks.items()}))

    def profile(self) -> StepProfile:
        def median(i):
            return statistics.median(sample[i] for sample in self.samples)

        ready = {name: statistics.median(sample[3][name] for sample in self.samples) for name in self.samples[0][3]}
        return StepProfile(median(0), median(1), median(2), ready, self.inputs.shape[0],
                           f"measured on {self.device.type}, 1 process", parameter_sizes(self.model))
