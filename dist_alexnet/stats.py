"""Running training figures on every rank: sums on the device, timings on the host, combined at log points.

The loss, accuracy and non-finite-loss counts of each micro-batch are added on the device, so a training
step never waits for them; they are read, together with the host's clocks, once per log point with one
gather over all ranks. The monitor writes what collect() returns; it never measures anything itself.
"""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so host clocks measure what the device did."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepStats:
    def __init__(self, accelerator, start_step: int = 0, pending: list[float] | None = None):
        """pending: TrainState.pending_train_sums of the checkpoint a run resumes from. They are global sums,
        so only rank 0 starts from them (every other rank from zero): the next collect() adds them in once."""
        self.accelerator = accelerator
        self.device = accelerator.device
        start = pending if pending and accelerator.is_main_process else [0.0, 0.0, 0.0]
        self.sums = torch.tensor(start, device=self.device)  # loss x samples, correct, samples
        self.nonfinite = torch.zeros((), device=self.device)  # non-finite losses since the last optimizer step
        self.timed_samples = 0  # samples this process trained since the last log point
        self.wait_seconds = 0.0  # time spent waiting for input batches since then
        self.active_seconds = 0.0  # training time since then, evaluation excluded
        self.local_seconds = 0.0  # since then: input, forward and loss, the part of a step that waits for no rank
        self.clock = self.epoch_start = time.perf_counter()
        self.last_step = start_step
        # over the whole launch
        self.epoch_seconds: list[float] = []  # training time of each epoch (or of the part of it this launch trained)
        self.samples_trained = 0  # by this process
        self.last_logged: dict = {}  # the values of the latest log point
        self.local_by_rank: list[float] = []  # at the latest log point: each rank's local seconds per step

    # --- per micro-batch, on the device

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One micro-batch's loss (its mean over the batch), predictions and labels. No host-device sync."""
        loss = loss.detach().float()
        self.nonfinite += ~torch.isfinite(loss)
        count = torch.full_like(loss, len(labels))  # made on the device: torch.tensor(n, device=...) would sync
        self.sums += torch.stack([loss * count, (logits.detach().argmax(1) == labels).sum().float(), count])

    def take_nonfinite(self) -> torch.Tensor:
        """The non-finite losses counted since the last optimizer step (a device tensor), and start again."""
        count = self.nonfinite.clone()
        self.nonfinite.zero_()
        return count

    # --- timing

    def start_epoch(self) -> None:
        self.clock = self.epoch_start = time.perf_counter()

    def timed(self, loader):
        """The loader's (images, labels, indices) batches, timing the wait for each and counting samples."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait_seconds += time.perf_counter() - start
            if batch is None:
                return
            self.timed_samples += len(batch[1])
            self.samples_trained += len(batch[1])
            yield batch

    def end_epoch(self) -> float:
        """Seconds the epoch's training took (one device sync per epoch makes it exact)."""
        _sync(self.device)
        now = time.perf_counter()
        self.active_seconds += now - self.clock
        self.clock = now
        self.epoch_seconds.append(now - self.epoch_start)
        return self.epoch_seconds[-1]

    def images_per_sec(self) -> float | None:
        """Training images per second over the whole launch, all processes together (None: it trained nothing)."""
        seconds = sum(self.epoch_seconds)
        return self.samples_trained * self.accelerator.num_processes / seconds if self.samples_trained else None

    # --- reading, on every rank (each is a collective)

    def pending(self) -> list[float]:
        """For a checkpoint: the global [loss x samples, correct, samples] not yet logged."""
        return self.accelerator.reduce(self.sums.clone(), reduction="sum").tolist()

    def collect(self, step: int) -> dict:
        """At a log point: the values since the previous one, global over all ranks. One gather; reading it
        is the log point's only wait for the device."""
        _sync(self.device)
        seconds = self.active_seconds + time.perf_counter() - self.clock
        peak_gb = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else 0.0
        host = [self.timed_samples, self.wait_seconds, seconds, peak_gb, self.local_seconds]
        local = torch.cat([self.sums, torch.tensor(host, device=self.device)])
        world = self.accelerator.num_processes
        rows = self.accelerator.gather(local).view(world, -1).tolist()
        loss_sum, correct, samples, timed_samples = (sum(r[i] for r in rows) for i in range(4))
        seconds = max(r[5] for r in rows) or 1e-9
        steps = max(step - self.last_step, 1)
        values = {
            "train/loss": loss_sum / samples,
            "train/acc": correct / samples,
            "perf/images_per_sec": timed_samples / seconds,
            "perf/images_per_sec_per_device": timed_samples / seconds / world,
            "perf/step_time_ms": 1000 * seconds / steps,
            "perf/data_wait_fraction": sum(r[4] / max(r[5], 1e-9) for r in rows) / world,
        }
        if self.device.type == "cuda":
            values["system/gpu_memory_gb"] = max(r[6] for r in rows)
        local_ms = sorted(1000 * r[7] / steps for r in rows)  # per rank: its local work per step
        values.update({"perf/rank_local_ms_min": local_ms[0], "perf/rank_local_ms_median": local_ms[len(rows) // 2],
                       "perf/rank_local_ms_max": local_ms[-1]})
        self.local_by_rank = [r[7] / steps for r in rows]
        self.sums.zero_()
        self.timed_samples, self.wait_seconds, self.active_seconds, self.local_seconds = 0, 0.0, 0.0, 0.0
        self.clock, self.last_step = time.perf_counter(), step
        self.last_logged = values
        return values
