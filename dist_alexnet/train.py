"""train(cfg): AlexNet on Fashion-MNIST with Accelerate, from one process to many nodes.

Reads top to bottom in the order things happen: set up, load data, build, prepare, then the loop
(forward, backward, step, log, evaluate, save). Every rank runs all of it; the few lines that
write files or print are guarded by `master` (rank 0), and every collective call is made on all ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DDPCommunicationHookType, DistributedDataParallelKwargs,
                               broadcast_object_list, gather_object, set_seed)

from dist_alexnet.checkpoint import (CheckpointError, PreemptionFlag, check_compatible, find_resume_checkpoint,
                                     list_checkpoints, requeue_slurm_job, save_checkpoint)
from dist_alexnet.config import ConfigError, TrainConfig, resolve_mixed_precision, save_yaml
from dist_alexnet.data import DataError, Split, load_data, make_loader, to_model_input, training_input
from dist_alexnet.model import AlexNet
from dist_alexnet.monitor import StepStats, make_monitor
from dist_alexnet.report import write_report


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Without CUDA, run on the CPU (gloo): Accelerate would otherwise leave the processes of
        # `accelerate launch --multi_gpu` or torchrun as independent single-process runs.
        cpu=not torch.cuda.is_available(),
        project_dir="runs",  # placeholder until resolve_run_dir() sets the run directory
        mixed_precision=resolve_mixed_precision(cfg),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        # Data order comes from EpochOrder (seed, epoch): Accelerate need not re-sync any RNG per epoch.
        rng_types=[],
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        kwargs_handlers=[DistributedDataParallelKwargs(
            bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=cfg.ddp_gradient_as_bucket_view,
            comm_hook=DDPCommunicationHookType({"none": "no"}.get(cfg.ddp_comm_hook, cfg.ddp_comm_hook)))],
    )
    if accelerator.num_processes != launched:
        raise ConfigError(f"the launcher started {launched} processes but they did not join one job "
                          f"(each sees world size {accelerator.num_processes}); on a machine without GPUs "
                          f"export ACCELERATE_USE_CPU=1")
    return accelerator


def resolve_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """--output-dir, else runs/<timestamp> as chosen by rank 0 (ranks may start a second apart)."""
    chosen = [cfg.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    # init_trackers("tensorboard") then writes its events to <run_dir>/tensorboard.
    accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = chosen[0]
    return Path(chosen[0])


def _write_problem(run_dir: Path) -> str | None:
    """Why `run_dir` cannot be created or written to (a small file created, synced and removed), or None."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok\n")
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so here
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink()  # created but not written (a full disk)
        # mkdir says only "Not a directory" or "File exists": name the part of the path that is a file
        # (os.path rather than Path: its checks answer False instead of raising PermissionError)
        blocker = next((p for p in (run_dir, *run_dir.parents) if os.path.exists(p) and not os.path.isdir(p)), None)
        return f"{blocker} is a file, not a directory" if blocker else err.strerror or str(err)
    return None


def check_output_dir(run_dir: Path, accelerator: Accelerator) -> None:
    """Before any work, on every rank: rank 0 creates the run directory and writes a file in it, and every
    rank learns the outcome, so a bad --output-dir fails in seconds with one line instead of at the first
    checkpoint. (Rank 0 writes every file of the run; the directory is meant to be on a shared file system.)"""
    problem = [_write_problem(run_dir) if accelerator.is_main_process else None]
    broadcast_object_list(problem, from_process=0)
    if problem[0]:
        raise ConfigError(f"output directory {run_dir} is not writable ({problem[0]}); choose another --output-dir")


def load_data_on_every_rank(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Split, Split]:
    """load_data in two turns: first the local main process of each node (it writes the synthetic set or
    downloads Fashion-MNIST), then the other ranks, which read the finished files.

    After each turn every rank learns whether any rank failed (gather_object all-gathers) and all raise the
    same error. local_main_process_first() would instead leave the other ranks waiting in its barrier for
    the collective timeout (30 minutes) when the first rank fails, say on missing files with --no-download."""
    splits, failure, report = None, None, None
    for first_turn in (True, False):
        if accelerator.is_local_main_process == first_turn:
            try:
                splits = load_data(cfg)
            except DataError as err:
                failure, report = err, str(err)
            except Exception as err:  # unexpected (it keeps its traceback), but shared too: no rank waits for it
                failure = err
                report = f"rank {accelerator.process_index} could not load the data ({type(err).__name__}: {err})"
        reports = [r for r in gather_object([report]) if r]
        if failure is not None:
            raise failure
        if reports:
            raise DataError(reports[0])
    return splits


def build_model(cfg: TrainConfig) -> AlexNet:
    return AlexNet(num_classes=10, in_channels=1, width=cfg.model_width)


def make_model_and_optimizer(cfg: TrainConfig, device: torch.device) -> tuple[AlexNet, torch.optim.Optimizer]:
    """The model on `device` and its Adam optimizer, with the fast paths of CUDA switched on."""
    model = build_model(cfg)
    fast = {}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN time its algorithms once per shape
        # NHWC activations let cuDNN use its fastest tensor-core convolutions (the 1-channel input needs no change).
        model = model.to(device, memory_format=torch.channels_last)
        fast["fused"] = True  # Adam for all parameters in one kernel; also spares fp16 a host-side overflow check
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, **fast)
    if cfg.compile:
        model.compile()  # in place: state_dict keys, checkpoints and DDP wrapping stay as without it
    return model, optimizer


def train_step(model, optimizer, accelerator: Accelerator, batch, cfg: TrainConfig, epoch: int, sums: torch.Tensor,
               nonfinite: torch.Tensor, stop_requested: bool = False, poison: bool = False) -> list | None:
    """One micro-batch: input transform (and augmentation) on the device, forward, backward; on the
    micro-batch that completes an optimizer step, the stop check, then the update. Adds loss x samples,
    correct and samples to `sums` and non-finite losses to `nonfinite`, on the device.

    The stop check is the loop's one host-device sync per optimizer step: each rank's [non-finite losses
    since the last step, stop requested] gathered to every rank. It is returned as a list of [bad, stop]
    pairs, one per rank (None between optimizer steps); if any rank saw a non-finite loss the update is
    not applied. `poison` makes this micro-batch's loss NaN (a test hook)."""
    inputs, labels = training_input(batch, cfg, epoch)
    flags = None
    with accelerator.accumulate(model):
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        if poison:
            loss = loss * float("nan")
        nonfinite += ~torch.isfinite(loss.detach())
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            local = torch.stack([nonfinite.float(), torch.full_like(nonfinite, float(stop_requested))])
            flags = accelerator.gather(local.reshape(1, 2)).tolist()
            nonfinite.zero_()
        if not (flags and any(bad for bad, _ in flags)):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    loss = loss.detach().float()
    count = torch.full_like(loss, len(labels))  # made on the device: torch.tensor(n, device=...) would sync
    sums += torch.stack([loss * count, (logits.detach().argmax(1) == labels).sum().float(), count])
    return flags


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


class Progress:
    """A tqdm bar when rank 0 writes to a terminal; plain log lines otherwise (Slurm logs)."""

    def __init__(self, master: bool, total: int, initial: int):
        self.bar = None
        self.enabled = master
        if master and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar:
            self.bar.update(n)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def show(self, **values) -> None:
        if self.bar:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite on some rank; every rank stopped before applying it."""


def rng_state() -> dict:
    """This rank's random state: dropout is the only consumer (data order and loaders have their own)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def injected_nan_step(rank: int) -> int | None:
    """Test hook: DIST_ALEXNET_INJECT_NAN="RANK:STEP" makes that rank's loss NaN at that optimizer step."""
    value = os.environ.get("DIST_ALEXNET_INJECT_NAN")
    if not value:
        return None
    target_rank, target_step = (int(x) for x in value.split(":"))
    return target_step if target_rank == rank else None


def open_sample_log(rank: int):
    """Debugging aid: with DIST_ALEXNET_SAMPLE_LOG=DIR every rank appends "epoch sample-index" lines for
    each training sample it consumes to DIR/rank<R>-<pid>.txt (used to prove resume neither repeats
    nor skips samples)."""
    folder = os.environ.get("DIST_ALEXNET_SAMPLE_LOG")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(Path(folder) / f"rank{rank}-{os.getpid()}.txt", "a", buffering=1)


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate after every epoch, checkpoint, and return the final metrics (on every rank).
    After a preemption signal it saves a checkpoint and returns {"preempted": True, ...} instead."""
    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    master = accelerator.is_main_process
    world = accelerator.num_processes
    run_dir = resolve_run_dir(cfg, accelerator)
    check_output_dir(run_dir, accelerator)
    log = print if master else (lambda *args, **kwargs: None)

    # --- data: rank 0 of each node writes the synthetic set / downloads first, the others then read it
    train_split, test_split = load_data_on_every_rank(cfg, accelerator)
    global_batch = cfg.batch_size * world
    if len(train_split) < global_batch:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {world} process(es) = {global_batch} is larger than "
                          f"the {len(train_split)} training samples; lower --batch-size")
    train_loader, train_order = make_loader(train_split, cfg, train=True)
    test_loader, _ = make_loader(test_split, cfg, train=False)

    # --- model and optimizer: same initial weights on every rank
    set_seed(cfg.seed)
    model, optimizer = make_model_and_optimizer(cfg, accelerator.device)

    # --- resume: every rank reads the same checkpoint files and so makes the same choice
    signature = {"model_width": cfg.model_width, "dataset": cfg.dataset,
                 "train_samples": len(train_split), "test_samples": len(test_split)}
    step, epoch, position, best_acc, pending = 0, 0, 0, None, [0.0, 0.0, 0.0]
    resumed = find_resume_checkpoint(run_dir, cfg.resume, log)
    if resumed:
        state = resumed["trainer_state"]
        check_compatible(state, signature, resumed["path"])
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        best_acc, pending = state["best_test_acc"], state["pending_train_sums"]

    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    set_seed(cfg.seed, device_specific=True)  # per-rank dropout streams...
    if resumed:  # ...or exactly where they were
        saved_states = resumed["rng_states"]
        if accelerator.process_index < len(saved_states):
            set_rng_state(saved_states[accelerator.process_index])
        if "scaler" in resumed and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(resumed["scaler"])
        if len(saved_states) != world:
            log(f"note: the checkpoint was made by {len(saved_states)} process(es), this run has {world}: "
                f"the data continues from the same sample, dropout streams are re-seeded where missing")

    def steps_in(samples: int) -> int:
        return math.ceil((samples // global_batch) / cfg.grad_accum)

    epochs_left = cfg.epochs - epoch
    total_steps = step + (steps_in(len(train_split) - position) + steps_in(len(train_split)) * (epochs_left - 1)
                          if epochs_left > 0 else 0)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    # A resumed run appends to the same event files' directory; purge_step drops whatever the
    # interrupted run logged after its checkpoint, so no step appears twice.
    accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": step + 1}} if resumed else {})
    progress = Progress(master, total=total_steps, initial=step)
    monitor = make_monitor(accelerator, cfg, run_dir, model, optimizer, total_steps, log=progress.log)
    progress.log(f"run directory {run_dir} | {world} process(es), {accelerator.distributed_type.value}, "
                 f"mixed precision {accelerator.mixed_precision} | {len(train_split)} train / "
                 f"{len(test_split)} test samples, global batch {global_batch}, {total_steps} steps")
    if resumed:
        progress.log(f"resumed from {resumed['path']} at step {step} (epoch {epoch + 1}, sample {position} "
                     f"of {len(train_split)})")
    del resumed  # its tensors are loaded; free the memory
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # the DDP options as the wrapper took them
        progress.log(f"DDP: gradient buckets of {model.bucket_bytes_cap / 2**20:g} MB, gradient_as_bucket_view "
                     f"{model.gradient_as_bucket_view}, gradients all-reduced in "
                     f"{'fp32' if cfg.ddp_comm_hook == 'none' else cfg.ddp_comm_hook}")

    def save(results: dict | None = None) -> Path:
        """Checkpoint the current step. Called on every rank: RNG states are gathered to rank 0, which
        writes; a failure there is broadcast so that every rank stops with the same error."""
        rng_states = gather_object([rng_state()])
        sums_now = stats.pending()
        outcome = [None]
        if master:
            files = {"model.safetensors": accelerator.unwrap_model(model).state_dict(),
                     "optimizer.pt": optimizer.state_dict(), "rng_states.pt": rng_states}
            if accelerator.scaler is not None:
                files["scaler.pt"] = accelerator.scaler.state_dict()
            trainer_state = {
                "step": step, "epoch": epoch, "position": position,
                "test_acc": results["test_acc"] if results else None, "best_test_acc": best_acc,
                "pending_train_sums": sums_now, "world_size": world, "signature": signature,
                "config": cfg.to_dict(),
            }
            try:
                outcome = [("saved", save_checkpoint(run_dir, step, files, trainer_state, cfg.keep_checkpoints))]
            except CheckpointError as err:
                outcome = [("failed", str(err))]
        if world > 1:
            broadcast_object_list(outcome, from_process=0)
        kind, detail = outcome[0]
        if kind == "failed":
            raise CheckpointError(detail)
        progress.log(f"saved checkpoint {detail}")
        return detail

    # --- the loop
    train_seconds, train_images, epoch_seconds = 0.0, 0, []
    # Running sums stay on the device; they are read (one sync) only when logging.
    stats = StepStats(accelerator, start_step=step, pending=pending if master else None)
    nonfinite = torch.zeros((), device=accelerator.device)  # non-finite losses since the last optimizer step
    last_train_loss = float("nan")
    results = {}
    nan_step = injected_nan_step(accelerator.process_index)
    sample_log = open_sample_log(accelerator.process_index)
    preemption = PreemptionFlag().install()
    try:
        while step < total_steps:
            train_order.set_position(epoch, position)
            stats.start_epoch()
            stop_signal = False
            for batch in stats.timed(train_loader):
                if sample_log:
                    sample_log.write("".join(f"{epoch} {i}\n" for i in batch[2].tolist()))
                # On the micro-batch that completes a step, every rank learns whether any rank saw a
                # non-finite loss (then nobody applies the step) or got a preemption signal (then all stop here).
                monitor.before_step(step + 1, batch, epoch)
                all_flags = train_step(model, optimizer, accelerator, batch, cfg, epoch, stats.sums, nonfinite,
                                       stop_requested=bool(preemption.received), poison=nan_step == step + 1)
                if all_flags:
                    bad_ranks = [rank for rank, (bad, _) in enumerate(all_flags) if bad]
                    if bad_ranks:
                        checkpoints = list_checkpoints(run_dir)
                        diverged = TrainingDiverged(
                            f"the loss became NaN/inf at step {step + 1} on rank(s) "
                            f"{', '.join(map(str, bad_ranks))}; the step was not applied. The learning rate "
                            f"(--lr {cfg.lr:g}) is likely too high for Adam. Last good checkpoint: "
                            f"{checkpoints[-1] if checkpoints else 'none yet'}; resume from it with a lower --lr")
                        monitor.diverged(str(diverged), step + 1)
                        raise diverged
                    stop_signal = any(sig for _, sig in all_flags)
                train_images += global_batch
                position += global_batch
                if not accelerator.sync_gradients:
                    continue
                step += 1
                progress.update()
                last_step = step == total_steps
                epoch_ends = len(train_split) - position < global_batch
                if step % cfg.log_every == 0 or last_step:
                    values = stats.collect(step)  # every rank: global over all ranks
                    monitor.log_train(step, epoch, values)
                    last_train_loss, train_acc = values["train/loss"], values["train/acc"]
                    progress.show(loss=f"{last_train_loss:.4f}", acc=f"{train_acc:.3f}")
                    if not progress.bar:
                        progress.log(f"epoch {epoch + 1} step {step}/{total_steps} | loss {last_train_loss:.4f} "
                                     f"acc {train_acc:.4f} | {values['perf/images_per_sec']:.0f} images/s")
                if stop_signal or last_step:
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not epoch_ends:
                    save()
            epoch_seconds.append(stats.end_epoch())  # an epoch, or the part this run trained
            train_seconds += epoch_seconds[-1]

            if stop_signal:
                path = save()
                progress.close()
                log(f"preempted at step {step} by {preemption.received or 'a signal on another rank'}: "
                    f"saved {path}; continue with --resume auto")
                requeue = cfg.requeue_on_preempt if cfg.requeue_on_preempt is not None else "SLURM_JOB_ID" in os.environ
                if master and requeue:
                    requeue_slurm_job(log)
                accelerator.end_training()
                return {"preempted": True, "steps": step, "checkpoint": str(path)}

            if len(train_split) - position < global_batch:  # the epoch is complete
                epoch, position = epoch + 1, 0
            results = evaluate(model, test_loader, accelerator, cfg.image_size)
            monitor.log_epoch(step, epoch_seconds[-1], results, test_split)
            where = f"end of epoch {epoch}" if position == 0 else f"epoch {epoch + 1}, sample {position}"
            progress.log(f"step {step} ({where}) | test loss {results['test_loss']:.4f} "
                         f"acc {results['test_acc']:.4f} ({results['test_correct']}/{results['test_samples']})")
            best_acc = max(best_acc if best_acc is not None else -1.0, results["test_acc"])
            save(results)
    finally:
        preemption.restore()
        if sample_log:
            sample_log.close()
    progress.close()
    if not results:  # resumed from the final checkpoint: nothing left to train, evaluate it again
        results = evaluate(model, test_loader, accelerator, cfg.image_size)

    # DDP keeps every rank's weights identical; record one checksum per rank so anyone can verify it.
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum).tolist()
    if len(set(checksums)) != 1:
        progress.log(f"WARNING: the ranks ended with different weights (parameter sums {checksums})")

    metrics = {
        "test_acc": results["test_acc"],
        "test_loss": results["test_loss"],
        "test_correct": results["test_correct"],
        "test_samples": results["test_samples"],
        "train_loss": last_train_loss,
        "steps": step,
        "epochs": epoch,
        "world_size": world,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "train_images_per_sec": train_images / train_seconds if train_seconds else 0.0,
        "epoch_seconds": epoch_seconds,
        "wall_seconds": time.perf_counter() - started,
        "param_checksums": checksums,
    }
    monitor.finish(metrics)
    problem = [None]  # rank 0 writes the results; a failure there (a full disk) ends every rank the same way
    if master:
        try:
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            report = write_report(run_dir)  # from the event files (flushed by monitor.finish) and metrics.json
        except OSError as err:
            problem = [f"could not write {err.filename or run_dir} ({err.strerror or err}); training finished and "
                       f"its final checkpoint is saved: free space, then rerun with --output-dir {run_dir} "
                       f"--resume auto to write the results (it resumes from that checkpoint and only evaluates)"]
    broadcast_object_list(problem, from_process=0)
    if problem[0]:
        raise ConfigError(problem[0])
    if master:
        progress.log(f"test accuracy {metrics['test_acc']:.4f} | {metrics['train_images_per_sec']:.0f} images/s "
                     f"| metrics: {run_dir / 'metrics.json'} | report: {report}\n"
                     f"watch it: tensorboard --logdir {run_dir / 'tensorboard'}")
    accelerator.end_training()
    return metrics
