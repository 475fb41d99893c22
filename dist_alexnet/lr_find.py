"""`dist-alexnet lr-find`: the learning-rate range test (Smith 2015, "Cyclical Learning Rates"; Lightning's Tuner).

From freshly initialized weights, train with a learning rate that rises exponentially from --start-lr to
--end-lr over --num-steps optimizer steps, on the run's data, model, batch, optimizer and world size (it runs
under `accelerate launch` like train), and record the loss of every step, averaged over the processes. The
curve is smoothed by an exponential moving average (loss_avg = beta * loss_avg + (1 - beta) * loss, bias
corrected as fastai and Lightning do; beta is --smoothing). The test stops early once the smoothed loss exceeds
--diverge-factor times its best value, or a loss is not finite.

The suggestion: the learning rate at the minimum of the smoothed loss, divided by 10 (fastai's "minimum / 10").
It is one argmin of a smoothed curve, so the noise of small batches barely moves it, where the steepest descent
(Lightning's rule, reported as well) is the argmin of a derivative of that noise; and it sits a decade below
where the loss stops falling, in the part of the curve where it falls fast, not at the edge of instability.

Its own small loop, not the trainer's: no schedule, no evaluation, no checkpoints. It writes only into its own
--output-dir (lr_find.json, lr_find.png, tensorboard/) and refuses a directory that holds a run's checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.tensorboard import SummaryWriter

from dist_alexnet.config import TrainConfig, options_for
from dist_alexnet.datasets import load_data_on_every_rank
from dist_alexnet.distributed import make_accelerator, on_main_process
from dist_alexnet.errors import ConfigError
from dist_alexnet.figures import new_figure, to_png
from dist_alexnet.inputs import make_loader, training_input
from dist_alexnet.lr_sweep import SKIP_START, Sweep, smooth, suggest
from dist_alexnet.model import build_model
from dist_alexnet.optimization import make_optimizer, set_learning_rate
from dist_alexnet.rundir import RunDir, write_atomically
from dist_alexnet.schedule import BatchPlan


def lr_find(cfg: TrainConfig, sweep: Sweep, json_path: str | None = None) -> dict:
    """Run the range test; every rank returns the result (rank 0 wrote the files)."""
    sweep.validate()
    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    out = Path(on_main_process(accelerator, lambda: cfg.output_dir or f"runs/lr-find-{datetime.now():%Y%m%d-%H%M%S}",
                               "naming the output directory"))
    on_main_process(accelerator, lambda: refuse_run_directory(out), "checking the output directory")
    lock = RunDir(out).claim(accelerator)
    try:
        train_split, _ = load_data_on_every_rank(cfg, accelerator)
        batch = BatchPlan.of(cfg, world)
        batch.check_fits(cfg, len(train_split))
        global_batch = batch.global_batch
        loader, order = make_loader(train_split, cfg, batch, train=True)
        set_seed(cfg.seed)  # the same initial weights on every rank
        model = build_model(cfg, accelerator.device)
        optimizer = make_optimizer(cfg, model, sweep.start_lr)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        set_seed(cfg.seed, device_specific=True)  # a dropout stream per rank, as in training
        if accelerator.is_main_process:
            print(f"lr-find: {world} process(es), global batch {global_batch}, {cfg.optimizer}, lr {sweep.start_lr:g} "
                  f"to {sweep.end_lr:g} over {sweep.num_steps} steps, output {out}", flush=True)
        started = time.perf_counter()
        lrs, losses, stop = sweep_losses(model, optimizer, accelerator, loader, order, cfg, sweep)
        seconds = time.perf_counter() - started
        if len(lrs) < 2 * SKIP_START:
            raise ConfigError(f"the loss diverged after {len(lrs)} steps, at lr {sweep.lr(len(lrs)):g}: lower "
                              f"--start-lr")
        smoothed = smooth(losses, sweep.smoothing)
        result = {**suggest(lrs, smoothed, sweep), "stopped": stop, "steps": len(lrs), "seconds": round(seconds, 1),
                  "world_size": world, "global_batch": global_batch, "optimizer": cfg.optimizer,
                  "sweep": dataclasses.asdict(sweep), "plot": str(RunDir(out).lr_find_plot),
                  "lrs": lrs, "losses": losses, "smoothed_losses": smoothed}
        # the --lr that gives train the suggested learning rate at this global batch under the config's --lr-scaling
        result["suggested_lr_option"] = result["suggested_lr"] * cfg.lr / batch.lr(cfg)
        result["config"] = {name: getattr(cfg, name) for name in options_for("lr-find")}
        on_main_process(accelerator, lambda: write_outputs(out, result, json_path), "writing the lr-find results")
    finally:
        if lock is not None:
            lock.release()
    if accelerator.is_main_process:
        print(describe(result, out, cfg), flush=True)
    return result


def sweep_losses(model, optimizer, accelerator, loader, order, cfg: TrainConfig,
                 sweep: Sweep) -> tuple[list[float], list[float], str]:
    """Train at sweep.lr(step) for each optimizer step; the loss of each step averaged over micro-batches and
    ranks (every rank gets the same figures, so every rank stops at the same step). Returns the learning rates,
    the losses and why it stopped."""
    lrs, losses, best, epoch = [], [], math.inf, 0
    beta, average = sweep.smoothing, 0.0
    model.train()
    while True:
        order.set_position(epoch)
        step_loss = torch.zeros((), device=accelerator.device)
        for batch in loader:
            step = len(lrs)
            set_learning_rate(optimizer, sweep.lr(step))
            inputs, labels = training_input(batch, cfg, epoch)
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(inputs), labels, label_smoothing=cfg.label_smoothing)
                accelerator.backward(loss)
                step_loss += loss.detach().float() / cfg.grad_accum
                if accelerator.sync_gradients and cfg.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            value = accelerator.reduce(step_loss, reduction="mean").item()
            step_loss = torch.zeros((), device=accelerator.device)
            if not math.isfinite(value):
                return lrs, losses, f"the loss was not finite at lr {sweep.lr(step):g}"
            lrs.append(sweep.lr(step))
            losses.append(value)
            average = beta * average + (1 - beta) * value
            smoothed = average / (1 - beta ** len(losses))
            best = min(best, smoothed)
            if accelerator.is_main_process and len(lrs) % cfg.log_every == 0:
                print(f"step {len(lrs)}/{sweep.num_steps} | lr {lrs[-1]:.3g} | loss {value:.4f} | smoothed "
                      f"{smoothed:.4f}", flush=True)
            if smoothed > sweep.diverge_factor * best:
                return lrs, losses, f"diverged: the smoothed loss exceeded {sweep.diverge_factor:g}x its best"
            if len(lrs) == sweep.num_steps:
                return lrs, losses, "completed"
        epoch += 1


def refuse_run_directory(out: Path) -> None:
    """lr-find writes only its own files: a training run's directory (it has checkpoints) is refused."""
    checkpoints = RunDir(out).checkpoints
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(f"{out} holds a training run's checkpoints; lr-find leaves them alone and writes its own "
                          f"results: choose another --output-dir (e.g. {out}/lr-find)")


def write_outputs(out: Path, result: dict, json_path: str | None) -> None:
    """lr_find.json, lr_find.png and TensorBoard scalars (lr_find/loss, lr_find/smoothed_loss, lr_find/lr over
    the step; lr_find/suggested_lr once) in `out`; the JSON also at json_path."""
    run_dir = RunDir(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    write_atomically(run_dir.lr_find_json, text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(json_path), text)

    with SummaryWriter(str(run_dir.tensorboard)) as writer:
        for step, (lr, loss, smoothed) in enumerate(zip(result["lrs"], result["losses"], result["smoothed_losses"])):
            writer.add_scalar("lr_find/loss", loss, step)
            writer.add_scalar("lr_find/smoothed_loss", smoothed, step)
            writer.add_scalar("lr_find/lr", lr, step)
        writer.add_scalar("lr_find/suggested_lr", result["suggested_lr"], len(result["lrs"]) - 1)

    figure = new_figure(7, 4.5)
    axes = figure.subplots()
    axes.semilogx(result["lrs"], result["losses"], color="0.75", linewidth=0.8, label="loss per step")
    axes.semilogx(result["lrs"], result["smoothed_losses"], color="C0",
                  label=f"smoothed (moving average, beta {result['sweep']['smoothing']:g})")
    axes.axvline(result["min_loss_lr"], color="C3", linestyle=":", label=f"minimum at {result['min_loss_lr']:.3g}")
    axes.axvline(result["suggested_lr"], color="C2", linestyle="--",
                 label=f"suggested {result['suggested_lr']:.3g} (minimum / 10)")
    # from the lowest loss to a little above the start: the diverging end would squash the rest of the curve
    axes.set_ylim(0.95 * min(result["losses"]), 1.25 * max(result["smoothed_losses"][:SKIP_START + 1]))
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(f"LR range test: {result['optimizer']}, global batch {result['global_batch']}, "
                   f"{result['world_size']} process(es)")
    axes.legend(fontsize=8)
    write_atomically(run_dir.lr_find_plot, to_png(figure))


def describe(result: dict, out: Path, cfg: TrainConfig) -> str:
    lines = [f"lr-find: {result['steps']} steps in {result['seconds']:g} s ({result['stopped']})",
             f"suggested lr {result['suggested_lr']:.3g} at global batch {result['global_batch']} (the smoothed loss's "
             f"minimum {result['min_smoothed_loss']:.3f} at lr {result['min_loss_lr']:.3g}, divided by 10; steepest "
             f"descent at {result['steepest_lr']:.3g})"]
    if cfg.lr_scaling != "none":
        lines.append(f"with --lr-scaling {cfg.lr_scaling} from batch {cfg.lr_reference_batch}: train "
                     f"--lr {result['suggested_lr_option']:.3g}")
    if result["note"]:
        lines.append(f"note: {result['note']}")
    lines.append(f"plot: {result['plot']}  json: {out / 'lr_find.json'}  tensorboard: {out / 'tensorboard'}")
    return "\n".join(lines)
