"""What a run reports while it trains: TensorBoard scalars, images, text and hyperparameters.

Two pieces, because measuring and writing happen in different places:
- StepStats runs on every rank. It keeps the training sums on the device and the host's timings, and
  combines them over all ranks only at log steps: logging adds no wait for the device to other steps.
- Monitor runs on rank 0 and writes everything into the run's single TensorBoard event file through
  Accelerate's TensorBoard tracker. The other ranks get a NullMonitor whose hooks do nothing, so the
  training loop calls the same hooks on every rank without rank checks.
TAGS lists every tag written and what it means (the README's table is the same list).
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

from dist_alexnet.data import CLASS_NAMES, MEAN, STD, training_input
from dist_alexnet.figures import (CHANCE_ACC, CHANCE_LOSS, class_accuracy_figure, confusion_matrix_figure,
                                  misclassified_figure, to_rgb)

# The metrics shown next to the configuration in TensorBoard's HPARAMS tab (the last value of each).
HPARAM_METRICS = ("test/acc", "test/loss", "train/loss", "train/acc", "perf/images_per_sec")


def class_tag(name: str) -> str:
    """test/class_acc/<class> with the class name made tag-safe ("T-shirt/top" -> "T-shirt_top")."""
    return "test/class_acc/" + name.replace("/", "_").replace(" ", "_")


# Every tag this module writes, with its meaning. Values are global over all ranks; x-axis = optimizer step.
TAGS = {
    # scalars
    "train/loss": "mean training cross-entropy since the previous point (every --log-every steps)",
    "train/acc": "training accuracy since the previous point (dropout on)",
    "train/lr": "Adam learning rate at that step",
    "train/grad_norm": "L2 norm of the whole gradient at that step (after DDP averaging, before the update)",
    "train/loss_scale": "fp16 only: the gradient scaler's loss scale (drops when gradients overflow)",
    "test/loss": "mean cross-entropy over the whole test set, after each epoch",
    "test/acc": "accuracy over the whole test set (every sample counted once), after each epoch",
    "test/class_acc/<class>": "accuracy on the test images of one class, after each epoch",
    "perf/images_per_sec": "training images per second, all processes together",
    "perf/images_per_sec_per_device": "the same divided by the number of processes",
    "perf/step_time_ms": "wall time per optimizer step, averaged since the previous point",
    "perf/data_wait_fraction": "share of that time spent waiting for the next input batch (mean over ranks); "
                               "near 0 = the model is the bottleneck, near 1 = the input pipeline is",
    "perf/epoch_seconds": "training time of the epoch, evaluation excluded (only the part this launch trained, "
                          "after a resume or with --max-steps), at the step the evaluation follows",
    "system/gpu_memory_gb": "CUDA only: peak GPU memory allocated by tensors, max over ranks (GB = 1e9 bytes)",
    # images
    "inputs/train_batch": "the first training batch as the model sees it (after resize and augmentation), once",
    "test/confusion_matrix": "test-set confusion matrix (rows: true class, columns: predicted), each evaluation",
    "test/class_accuracy": "bar chart of per-class test accuracy, each evaluation",
    "test/misclassified": "a few misclassified test images with predicted and true class, each evaluation",
    # text
    "run/config": "the resolved configuration (config.yaml)",
    "run/command": "the command that reproduces the run",
    "run/launcher": "how the processes were launched (accelerate launch, torchrun, Slurm, or directly)",
    "run/summary": "the final metrics (metrics.json), at the end",
    "warnings/divergence": "only when raised: the loss became NaN/inf (training stops) or, after the first epoch, "
                           "the model is still at chance level",
}
CUDA_ONLY_TAGS = ("system/gpu_memory_gb",)
FP16_ONLY_TAGS = ("train/loss_scale",)
WARNING_TAGS = ("warnings/divergence",)


def is_log_step(step: int, log_every: int, total_steps: int) -> bool:
    return step % log_every == 0 or step == total_steps


def loss_scale_note(before: float | None, after: float, first_step: int, last_step: int) -> str | None:
    """fp16, at a log step: a loss scale lower than at the previous one means GradScaler found inf/NaN gradients
    in steps first_step..last_step, skipped those updates and lowered the scale. That is how it finds the largest
    safe scale: a note, not an error (a NaN/inf *loss* is what stops training)."""
    if before is None or after >= before:
        return None
    steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    return (f"note: fp16 gradient overflow in {steps}: GradScaler skipped step(s) and lowered the loss scale "
            f"from {before:g} to {after:g} (normal early in fp16 training; not an error)")


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so host clocks measure what the device did."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepStats:
    """Every rank: training loss/accuracy sums on the device plus host timings, read at log steps only.
    train_step() adds each micro-batch's loss x samples, correct predictions and samples to `sums`."""

    def __init__(self, accelerator, start_step: int = 0, pending: list[float] | None = None):
        """pending: pending() as saved in the checkpoint a run resumes from (give it to one rank only)."""
        self.accelerator = accelerator
        self.device = accelerator.device
        self.sums = torch.tensor(pending or [0.0, 0.0, 0.0], device=self.device)  # loss x n, correct, n
        self.timed_samples = 0  # samples this process trained in this window (pending ones excluded)
        self.wait_seconds = 0.0  # time spent waiting for input batches
        self.active_seconds = 0.0  # training time in this window, evaluation excluded
        self.clock = self.epoch_start = time.perf_counter()
        self.last_step = start_step

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
            yield batch

    def pending(self) -> list[float]:
        """Every rank, for a checkpoint: the global [loss x samples, correct, samples] not yet logged."""
        return self.accelerator.reduce(self.sums.clone(), reduction="sum").tolist()

    def end_epoch(self) -> float:
        """Seconds the epoch's training took (one device sync per epoch makes it exact)."""
        _sync(self.device)
        now = time.perf_counter()
        self.active_seconds += now - self.clock
        self.clock = now
        return now - self.epoch_start

    def collect(self, step: int) -> dict:
        """At a log step, on every rank: the values since the previous log step, global over all ranks.
        One gather; reading it is the log step's only wait for the device."""
        _sync(self.device)
        seconds = self.active_seconds + time.perf_counter() - self.clock
        peak_gb = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else 0.0
        host = [self.timed_samples, self.wait_seconds, seconds, peak_gb]
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
        self.sums.zero_()
        self.timed_samples, self.wait_seconds, self.active_seconds = 0, 0.0, 0.0
        self.clock, self.last_step = time.perf_counter(), step
        return values


def make_monitor(accelerator, cfg, run_dir: Path, model, optimizer, total_steps: int, log=print):
    """Monitor on rank 0 (call after accelerator.init_trackers("tensorboard")), NullMonitor elsewhere."""
    if accelerator.is_main_process:
        return Monitor(accelerator, cfg, run_dir, model, optimizer, total_steps, log)
    return NullMonitor()


class NullMonitor:
    """Ranks other than 0: the same hooks, doing nothing."""

    def before_step(self, step, batch, epoch):
        pass

    def log_train(self, step, epoch, values):
        pass

    def log_epoch(self, step, epoch_seconds, results, test_split):
        pass

    def diverged(self, message, step):
        pass

    def finish(self, metrics):
        pass


def _quiet_event_writer(previous):
    """A threading.excepthook that leaves out the OSError of TensorBoard's writer thread: Python would print
    it with a traceback, and the thread raises it again at the next write, where EventWriter reports it."""
    def hook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiet_event_writer = True
    return hook


class EventWriter:
    """The run's TensorBoard SummaryWriter (rank 0), except that a failed write (a full disk, say) turns
    TensorBoard off with one warning instead of raising: only rank 0 writes events, so raising would stop
    rank 0 alone. A disk that stays full stops every rank at the next checkpoint, with its own message."""

    def __init__(self, accelerator, log=print):
        self.accelerator, self.log, self.failed = accelerator, log, False
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True)
        if not getattr(threading.excepthook, "quiet_event_writer", False):
            threading.excepthook = _quiet_event_writer(threading.excepthook)

    def __getattr__(self, name: str):
        """add_scalar, add_image, flush: the SummaryWriter's, guarded."""
        return functools.partial(self._call, getattr(self.writer, name))

    def add_summary(self, summary, step: int) -> None:
        """A summary protobuf (text, hparams) into the same event file."""
        self._call(self.writer.file_writer.add_summary, summary, step)

    def _call(self, method, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            method(*args, **kwargs)
        except OSError as err:  # raised by the writer's thread, at this or a later call
            self.failed = True
            # end_training() would close the broken writer, which raises the same error again
            self.accelerator.trackers.remove(self.accelerator.get_tracker("tensorboard"))
            self.log(f"warning: cannot write TensorBoard events to {self.writer.log_dir} ({err.strerror or err}); "
                     f"training goes on without them")


class Monitor:
    """Rank 0: writes everything into the run's one TensorBoard event file."""

    def __init__(self, accelerator, cfg, run_dir: Path, model, optimizer, total_steps: int, log=print):
        import yaml

        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, Path(run_dir)
        self.model, self.optimizer, self.total_steps, self.log = model, optimizer, total_steps, log
        self.writer = EventWriter(accelerator, log)
        self.grad_norm = None  # device tensor, set at steps that get logged
        self.next_step = None  # the optimizer step the coming micro-batches belong to
        self.wrote_inputs = False
        self.warned_chance = False
        # fp16: the loss scale at the previous log step (before the first step: the initial or resumed scale)
        self.loss_scale = float(accelerator.scaler.get_scale()) if accelerator.scaler is not None else None
        self.logged_step = None  # the previous log step (or the step the run started from)
        # Called by the optimizer right before it updates the weights (not on steps it skips).
        getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(self._before_update)

        self.text("run/config", _code(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
        command, launcher = launch_command()
        self.text("run/command", _code(command))
        self.text("run/launcher", launcher)
        self._write_hparams()

    # --- hooks called by the training loop

    def before_step(self, step: int, batch, epoch: int) -> None:
        """Before each micro-batch of optimizer step `step`: the input grid (once), and the note of which
        step the gradient-norm hook is about to see."""
        self.next_step = step
        if self.logged_step is None:
            self.logged_step = step - 1
        if not self.wrote_inputs:
            self.wrote_inputs = True
            self._input_grid(batch, epoch, step - 1)

    def _input_grid(self, batch, epoch: int, step: int) -> None:
        """The first batch exactly as the model gets it (augmentation depends only on seed, epoch and sample
        index, so computing it again gives the same images), un-normalized back to [0, 1] for display."""
        from torchvision.utils import make_grid

        inputs, _ = training_input(batch, self.cfg, epoch)
        images = (inputs[:32].detach().float().cpu() * STD + MEAN).clamp(0, 1)
        self.writer.add_image("inputs/train_batch", make_grid(images, nrow=8, pad_value=1.0), step)

    def _before_update(self, optimizer, args, kwargs) -> None:
        """Optimizer pre-step hook: the gradient norm, at steps that get logged (on the device, no sync)."""
        if self.next_step is None or not is_log_step(self.next_step, self.cfg.log_every, self.total_steps):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        # fp16: GradScaler unscales the gradients before step(), except for fused optimizers, which get the
        # scale as an argument and unscale inside their kernel.
        if kwargs.get("grad_scale") is not None:
            norm = norm / kwargs["grad_scale"]
        self.grad_norm = norm

    def log_train(self, step: int, epoch: int, values: dict) -> None:
        """At a log step, with StepStats.collect()'s global values; epoch counts from 0."""
        values = dict(values, **{"train/lr": self.optimizer.param_groups[0]["lr"]})
        if self.grad_norm is not None:
            values["train/grad_norm"] = float(self.grad_norm)
        if self.accelerator.scaler is not None:
            scale = float(self.accelerator.scaler.get_scale())  # a sync, at log steps only (collect() has one)
            note = loss_scale_note(self.loss_scale, scale, (self.logged_step or 0) + 1, step)
            if note:
                self.log(note)
            values["train/loss_scale"] = self.loss_scale = scale
        self.logged_step = step
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self._check_chance_level(step, epoch, values["train/loss"], values["train/acc"])
        self.writer.flush()  # what is logged survives a kill -9

    def log_epoch(self, step: int, epoch_seconds: float, results: dict, test_split) -> None:
        """After each evaluation: test metrics, per-class accuracy, confusion matrix, misclassified images."""
        predictions, labels = results["predictions"], results["labels"]
        confusion, per_class = results["confusion_matrix"], results["per_class_acc"]
        self.writer.add_scalar("test/loss", results["test_loss"], step)
        self.writer.add_scalar("test/acc", results["test_acc"], step)
        for name, acc in zip(CLASS_NAMES, per_class):
            self.writer.add_scalar(class_tag(name), acc, step)
        self.writer.add_scalar("perf/epoch_seconds", epoch_seconds, step)

        if self.cfg.log_figures:
            title = f"step {step}: test accuracy {results['test_acc']:.4f}"
            self.image("test/confusion_matrix", confusion_matrix_figure(confusion, title), step)
            self.image("test/class_accuracy", class_accuracy_figure(per_class, title), step)
            wrong = (predictions != labels).nonzero().flatten()[:12]
            indices = results["indices"][wrong]
            self.image("test/misclassified", misclassified_figure(
                test_split.images[indices], predictions[wrong].tolist(), labels[wrong].tolist()), step)
        self.writer.flush()  # a finished epoch is visible in TensorBoard right away

    def finish(self, metrics: dict) -> None:
        """At the end: the final metrics as text, and everything on disk (the report reads it next)."""
        rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
        self.text("run/summary", f"| metric | value |\n|---|---|\n{rows}", metrics.get("steps", 0))
        self.writer.flush()

    # --- writing

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self.writer.add_summary(text_pb(tag, markdown), step)

    def image(self, tag: str, figure, step: int) -> None:
        self.writer.add_image(tag, to_rgb(figure), step, dataformats="HWC")

    def _write_hparams(self) -> None:
        """HPARAMS tab: this run is one row (its config, and the last value of each HPARAM_METRICS tag).
        Written into the run's own event file (SummaryWriter.add_hparams would make a separate run)."""
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.plugins.hparams import summary_v2 as hp

        values = {k: v for k, v in self.cfg.to_dict().items() if v is not None}  # None has no hparam type
        values.update(world_size=self.accelerator.num_processes,
                      global_batch_size=self.cfg.batch_size * self.accelerator.num_processes * self.cfg.grad_accum,
                      mixed_precision=self.accelerator.mixed_precision,
                      distributed_type=self.accelerator.distributed_type.value)
        # Types but no value domains: a domain taken from one run would hide other runs' values in the UI.
        kinds = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING}
        experiment = api_pb2.Experiment(
            hparam_infos=[api_pb2.HParamInfo(name=k, type=kinds.get(type(v), api_pb2.DATA_TYPE_FLOAT64))
                          for k, v in values.items()],
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAM_METRICS],
            time_created_secs=time.time())
        config = summary_pb2.Summary()
        config.value.add(tag=metadata.EXPERIMENT_TAG, tensor=metadata.NULL_TENSOR,
                         metadata=metadata.create_summary_metadata(
                             plugin_data_pb2.HParamsPluginData(experiment=experiment)))
        self.writer.add_summary(config, 0)
        self.writer.add_summary(hp.hparams_pb(values), 0)

    def diverged(self, message: str, step: int) -> None:
        """The loss became non-finite and training stops: the reason, in TensorBoard too."""
        self.text("warnings/divergence", message, step)
        self.writer.flush()

    def _check_chance_level(self, step: int, epoch: int, loss: float, acc: float) -> None:
        """Warn once when, after the first epoch, the model is still at chance: accuracy near 10% and a loss
        at or above ln 10, the loss of a uniform guess (what Adam with lr 1e-2 did in the reference
        tutorial; a far larger loss means the weights blew up). Non-finite losses stop training instead."""
        if self.warned_chance or epoch < 1 or abs(acc - CHANCE_ACC) >= 0.05 or loss < CHANCE_LOSS - 0.1:
            return
        self.warned_chance = True
        lr = self.optimizer.param_groups[0]["lr"]
        message = (f"WARNING: training diverged or is stuck at chance: after {epoch} epoch(s) accuracy is "
                   f"{acc:.1%} (chance: 10%) and the training loss {loss:.4g} (a uniform guess: ln 10 = "
                   f"{CHANCE_LOSS:.3f}). Likely cause: the learning rate is too high for Adam (--lr {lr:g}); "
                   f"the reference run uses 1e-3: try 1e-3 or lower.")
        self.log(message)
        self.text("warnings/divergence", message, step)


def _code(text: str) -> str:
    """Markdown code block (indented: TensorBoard's text plugin renders it verbatim)."""
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


# --- how the run was started

def _parent_argv() -> list[str] | None:
    try:  # Linux; elsewhere the run's own command line is used
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _launcher(argv: list[str]) -> str | None:
    head = [Path(a).name for a in argv[:3]]
    if "accelerate" in head or "accelerate.commands.launch" in argv[:3]:
        return "accelerate launch"
    if "torchrun" in head or "torch.distributed.run" in argv[:3]:
        return "torchrun"
    return None


def _tidy(argv: list[str]) -> list[str]:
    """[/venv/bin/python, /venv/bin/accelerate, launch, ...] -> [accelerate, launch, ...]: as typed with the
    project's virtualenv active."""
    argv = list(argv)
    if len(argv) > 1 and Path(argv[0]).name.startswith("python") and Path(argv[1]).name in (
            "accelerate", "torchrun", "dist-alexnet"):
        argv = argv[1:]
    if Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    elif Path(argv[0]).name in ("accelerate", "torchrun", "dist-alexnet"):
        argv[0] = Path(argv[0]).name
    return argv


def launch_command() -> tuple[str, str]:
    """(shell command that reproduces the run, from the directory it ran in; a line naming the launcher).
    Under `accelerate launch` or torchrun the launcher's own command line is the one to rerun, read
    from the parent process; otherwise this process's command line as it was given (sys.orig_argv)."""
    parent = _parent_argv()
    launcher = _launcher(parent) if parent else None
    argv = _tidy(parent if launcher else sys.orig_argv)
    command = f"cd {shlex.quote(os.getcwd())}\n{shlex.join(argv)}"
    world = os.environ.get("WORLD_SIZE", "1")
    note = f"launched by {launcher} ({world} process(es))" if launcher else f"launched directly ({world} process(es))"
    if os.environ.get("SLURM_JOB_ID"):
        note += (f" inside Slurm job {os.environ['SLURM_JOB_ID']} ({os.environ.get('SLURM_JOB_NAME', '')}); "
                 f"on the cluster, resubmit the same batch script to reproduce it")
    return command, note + "; the command assumes the project's virtualenv is active"
