"""train(cfg): AlexNet on Fashion-MNIST with Accelerate, from one process to many nodes.

Reads top to bottom in the order things happen: set up, load data, build, prepare, then the loop
(forward, backward, step, log, evaluate, save). Every rank runs all of it; the few lines that
write files or print are guarded by `master` (rank 0), and every collective call is made on all ranks.
"""

from __future__ import annotations

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
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed

from dist_alexnet.checkpoint import save_checkpoint
from dist_alexnet.config import ConfigError, TrainConfig, resolve_mixed_precision, save_yaml
from dist_alexnet.data import load_data, make_loader, to_model_input
from dist_alexnet.model import AlexNet


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


def build_model(cfg: TrainConfig) -> AlexNet:
    return AlexNet(num_classes=10, in_channels=1, width=cfg.model_width)


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, image_size: int) -> dict:
    """Exact evaluation: every sample counted once whatever the world size. gather_for_metrics drops
    the duplicates Accelerate pads the last batch with, so counts equal the test-set size."""
    model.eval()
    losses, predictions, labels = [], [], []
    for images, targets, _ in loader:
        logits = model(to_model_input(images, image_size)).float()
        loss = F.cross_entropy(logits, targets, reduction="none")
        loss, pred, targets = accelerator.gather_for_metrics((loss, logits.argmax(1), targets))
        losses.append(loss), predictions.append(pred), labels.append(targets)
    model.train()
    losses, predictions, labels = torch.cat(losses), torch.cat(predictions), torch.cat(labels)
    correct = int((predictions == labels).sum())
    return {
        "test_loss": float(losses.mean()),
        "test_acc": correct / len(labels),
        "test_correct": correct,
        "test_samples": len(labels),
        "predictions": predictions.cpu(),
        "labels": labels.cpu(),
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


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate after every epoch, checkpoint, and return the final metrics (on every rank)."""
    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    master = accelerator.is_main_process
    world = accelerator.num_processes
    run_dir = resolve_run_dir(cfg, accelerator)

    # --- data: rank 0 of each node writes the synthetic set / downloads first, the others then read it
    with accelerator.local_main_process_first():
        train_split, test_split = load_data(cfg)
    global_batch = cfg.batch_size * world
    if len(train_split) < global_batch:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {world} process(es) = {global_batch} is larger than "
                          f"the {len(train_split)} training samples; lower --batch-size")
    train_loader, train_order = make_loader(train_split, cfg, train=True)
    test_loader, _ = make_loader(test_split, cfg, train=False)

    # --- model and optimizer: same initial weights on every rank, then per-rank dropout streams
    set_seed(cfg.seed)
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    set_seed(cfg.seed, device_specific=True)

    micro_batches_per_epoch = len(train_split) // global_batch
    steps_per_epoch = math.ceil(micro_batches_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    accelerator.init_trackers("tensorboard")
    progress = Progress(master, total=total_steps, initial=0)
    progress.log(f"run directory {run_dir} | {world} process(es), {accelerator.distributed_type.value}, "
                 f"mixed precision {accelerator.mixed_precision} | {len(train_split)} train / "
                 f"{len(test_split)} test samples, global batch {global_batch}, {total_steps} steps")

    # --- the loop
    step, epoch = 0, 0
    train_seconds, train_images = 0.0, 0
    # Running sums stay on the device; they are read (one sync) only when logging.
    sums = torch.zeros(3, device=accelerator.device)  # loss x samples, correct, samples
    last_train_loss = float("nan")
    results = {}
    while step < total_steps:
        train_order.set_position(epoch)
        epoch_start = time.perf_counter()
        for images, labels, _ in train_loader:
            with accelerator.accumulate(model):
                logits = model(to_model_input(images, cfg.image_size))
                loss = F.cross_entropy(logits, labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            train_images += global_batch
            sums += torch.stack([loss.detach().float() * len(labels),
                                 (logits.detach().argmax(1) == labels).sum().float(),
                                 torch.tensor(float(len(labels)), device=sums.device)])
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update()
            last_step = step == total_steps
            if step % cfg.log_every == 0 or last_step:
                loss_sum, correct, count = accelerator.reduce(sums, reduction="sum").tolist()
                sums.zero_()
                last_train_loss = loss_sum / count
                accelerator.log({"train/loss": last_train_loss, "train/acc": correct / count}, step=step)
                progress.show(loss=f"{last_train_loss:.4f}", acc=f"{correct / count:.3f}")
                if not progress.bar:
                    progress.log(f"epoch {epoch + 1} step {step}/{total_steps} | loss {last_train_loss:.4f} "
                                 f"acc {correct / count:.4f}")
            if last_step:
                break
        train_seconds += time.perf_counter() - epoch_start
        epoch += 1

        results = evaluate(model, test_loader, accelerator, cfg.image_size)
        accelerator.log({"test/loss": results["test_loss"], "test/acc": results["test_acc"]}, step=step)
        progress.log(f"epoch {epoch} done at step {step} | test loss {results['test_loss']:.4f} "
                     f"acc {results['test_acc']:.4f} ({results['test_correct']}/{results['test_samples']})")
        if master:
            state = {"step": step, "epoch": epoch, "test_acc": results["test_acc"], "config": cfg.to_dict()}
            path = save_checkpoint(run_dir, step, accelerator.unwrap_model(model).state_dict(), state,
                                   keep=cfg.keep_checkpoints)
            progress.log(f"saved checkpoint {path}")
        accelerator.wait_for_everyone()
    progress.close()

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
        "wall_seconds": time.perf_counter() - started,
        "param_checksums": checksums,
    }
    if master:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        progress.log(f"test accuracy {metrics['test_acc']:.4f} | {metrics['train_images_per_sec']:.0f} images/s "
                     f"| metrics: {run_dir / 'metrics.json'}\nwatch it: tensorboard --logdir {run_dir / 'tensorboard'}")
    accelerator.end_training()
    return metrics
