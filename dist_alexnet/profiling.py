"""--profile-steps A:B: torch.profiler over optimizer steps A to B, on every rank.

Every rank records its own trace, <run dir>/profile/rank<R>.json (Chrome / Perfetto trace format): a rank that
is slower than the others (a straggler, a slow input pipeline on one node) only shows in its own. Rank 0 prints
the operators that took the most time of their own (self time). Off, it costs one attribute test per step.
Open a trace at https://ui.perfetto.dev (or chrome://tracing): "Open trace file", then the rank's JSON file.
"""

from __future__ import annotations

import atexit
from pathlib import Path

import torch

from dist_alexnet.device import default_device, use_cuda
from dist_alexnet.rundir import RunDir


def parse_steps(spec: str) -> tuple[int, int]:
    """"A:B" -> (A, B), 1 <= A <= B; ValueError otherwise."""
    first, last = (int(part) for part in spec.split(":"))
    if not 1 <= first <= last:
        raise ValueError(spec)
    return first, last


class StepProfiler:
    """Starts at the first micro-batch of step A, stops after step B, writes the trace, prints the top operators."""

    def __init__(self, spec: str, run_dir: Path, rank: int, log=print, top: int = 10):
        self.first, self.last = parse_steps(spec)
        self.path = RunDir(run_dir).profile(rank)
        self.log, self.top, self.profile = log, top, None
        self.started, self.done = 0, 0  # the first step profiled, the last one completed

    def before(self, step: int) -> None:
        """Before a micro-batch of optimizer step `step`."""
        if self.profile is None and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if use_cuda():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profile.start()
            self.started = step
            # A run that stops inside the window (a preemption, an error) must still close the profile: one left
            # open when the interpreter shuts down ends the process with SIGSEGV.
            atexit.register(self.close)

    def after(self, step: int) -> None:
        """After optimizer step `step` is complete."""
        if self.profile is not None:
            self.done = step
            if step >= self.last:
                self.close()

    def close(self) -> None:
        """Stop an open profile and write what it recorded (steps up to the last one completed)."""
        if self.profile is None:
            return
        atexit.unregister(self.close)
        profile, self.profile = self.profile, None
        profile.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.path))
        device = default_device().type
        table = profile.key_averages().table(sort_by=f"self_{device}_time_total", row_limit=self.top)
        steps = f"{self.started}-{self.done}" if self.done else f"{self.started} (cut short)"
        cut = "" if self.done >= self.last else f", the run stopped inside --profile-steps {self.first}:{self.last}"
        self.log(f"profile of steps {steps} ({self.path}; the other ranks' next to it{cut}), the top {self.top} "
                 f"operators by self time:\n{table}")


class NoProfiler:
    """--profile-steps not given: nothing to do."""

    def before(self, step: int) -> None:
        pass

    def after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
