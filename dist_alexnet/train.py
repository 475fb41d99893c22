"""train(cfg): AlexNet on Fashion-MNIST with Accelerate, from one process to many nodes.

train() is the outline; each of its steps is a function below, in the order they run. Every rank runs
all of it, and every collective call is made on all ranks. The few things one rank does for all (file
writes, the run directory's name) go through distributed.on_main_process, which shares their outcome;
printing goes through Progress and TensorBoard through the monitor, both silent on other ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from dist_alexnet.checkpoint import Expected, checkpoint_step, find_resume_checkpoint, list_checkpoints, save_checkpoint
from dist_alexnet.config import TrainConfig, rank_fingerprint, resume_changes, save_yaml
from dist_alexnet.datasets import Split, data_fingerprint, load_data_on_every_rank
from dist_alexnet.debug_hooks import DebugHooks
from dist_alexnet.distributed import (check_ranks_agree, collective_failed, is_collective_failure, make_accelerator,
                                      on_main_process, phase)
from dist_alexnet.errors import ConfigError, TrainingDiverged
from dist_alexnet.health import StragglerWatch, check_replicas_agree
from dist_alexnet.inputs import EpochOrder, make_loader, training_input
from dist_alexnet.model import build_model
from dist_alexnet.monitor import Monitor, NullMonitor, make_monitor, open_trackers, wait_to_sort_after_earlier_events
from dist_alexnet.optimization import (LRSchedule, WeightEMA, make_optimizer, optimizer_implementation,
                                       set_learning_rate)
from dist_alexnet.parallel import DataParallel, make_parallelism, state_bytes
from dist_alexnet.preemption import PreemptionFlag, requeue_slurm_job, should_requeue
from dist_alexnet.profiling import NoProfiler, StepProfiler
from dist_alexnet.progress import Progress
from dist_alexnet.report import write_report
from dist_alexnet.rundir import RunDir, write_metrics
from dist_alexnet.schedule import BatchPlan, Schedule
from dist_alexnet.state import TrainState, rng_state, set_rng_state
from dist_alexnet.stats import StepStats
from dist_alexnet.steps import StepAsks, TrainStep, evaluate


def train(cfg: TrainConfig, preemption: PreemptionFlag | None = None) -> dict:
    """Train, evaluate after every epoch, checkpoint, and return the final metrics (on every rank).
    After a preemption signal it saves a checkpoint and returns {"preempted": True, ...} instead.
    `preemption`: the signal handlers, when the caller installed them earlier (the command line does)."""
    started = time.perf_counter()
    parts, state = None, None
    with contextlib.ExitStack() as held:  # the signal handlers, the run directory's lock, the debug hooks
        preemption = preemption or held.enter_context(PreemptionFlag())
        try:
            parts = set_up(cfg, held)
            state, resumed_from = restore(parts)
            run = start(parts, state, resumed_from)
            hooks = held.enter_context(DebugHooks(run.accelerator.process_index, run.model))
            return fit(run, state, preemption, hooks, started)
        except RuntimeError as err:  # another rank died or hung: one line here, not a watchdog's trace
            if parts is None or not is_collective_failure(err):
                raise
            raise collective_failed(err, parts.accelerator, state.step if state else 0, cfg.collective_timeout) from err


def fit(run: Run, state: TrainState, preemption: PreemptionFlag, hooks: DebugHooks, started: float) -> dict:
    """Epoch after epoch: train, evaluate, save; then the results, or a checkpoint when preempted."""
    results = None
    while not run.schedule.is_last(state.step):
        if train_epoch(run, state, preemption, hooks) == "preempted":
            return stop_for_preemption(run, state, preemption)
        if run.schedule.epoch_over(state.position):
            state.start_next_epoch()
        results = evaluate_and_log(run, state)
        save(run, state, test_acc=results["test_acc"])
    if results is None:  # resumed from the final checkpoint: nothing left to train, evaluate it again
        results = evaluate_run(run)
    return finish(run, state, results, started)


@dataclass
class Parts:
    """What a training run is made of before its state is known (every rank has its own): built by set_up()."""
    cfg: TrainConfig
    accelerator: Accelerator
    dir: RunDir
    progress: Progress
    train_split: Split
    test_split: Split
    train_loader: torch.utils.data.DataLoader
    train_order: EpochOrder
    test_loader: torch.utils.data.DataLoader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    parallel: DataParallel  # how the model is spread over the ranks: --parallelism (parallel.py)
    ema: WeightEMA | None  # the moving average of the weights (--ema-decay), evaluated instead of them
    batch: BatchPlan
    lr: float  # the peak learning rate: --lr after --lr-scaling

    def by_name(self) -> dict:
        """The parts as keyword arguments (dataclasses.asdict would copy them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Parts)}

    @property
    def signature(self) -> dict:
        """What a checkpoint must have been made for to be resumed by this run."""
        return {"model_width": self.cfg.model_width, "dataset": self.cfg.dataset,
                "train_samples": len(self.train_split), "test_samples": len(self.test_split)}


@dataclass
class Run(Parts):
    """The parts, and what start() plans and opens from the state the run starts at."""
    resumed_from: Path | None  # retention never deletes it
    schedule: Schedule
    lr_schedule: LRSchedule
    stats: StepStats
    train_step: TrainStep
    stragglers: StragglerWatch
    monitor: Monitor | NullMonitor
    profiler: StepProfiler | NoProfiler
    last_save: float = field(default_factory=time.monotonic)  # rank 0's clock decides --checkpoint-minutes


# ----------------------------------------------------------------------------- before the loop

def set_up(cfg: TrainConfig, held: contextlib.ExitStack) -> Parts:
    """The Accelerator, the run directory (checked writable and locked before any work; the lock is `held`
    until the run ends), the data, the model with the same initial weights on every rank, its optimizer (and
    weight average) and the loaders, prepared for DDP and mixed precision."""
    accelerator = make_accelerator(cfg)
    check_ranks_agree(accelerator, rank_fingerprint(cfg), "options", "give every rank the same command line and "
                      "config file (only --data-dir, --download and --num-workers may differ between nodes)")
    progress = Progress(enabled=accelerator.is_main_process)
    run_dir = RunDir.choose(cfg.output_dir, accelerator)
    lock = run_dir.claim(accelerator)
    if lock is not None:
        held.callback(lock.release)
    train_split, test_split = load_data_on_every_rank(cfg, accelerator)
    check_ranks_agree(accelerator, {"training set": data_fingerprint(train_split), "test set": data_fingerprint(
        test_split)}, "data", "each node's --data-dir must hold the same files (compare their checksums)")
    batch = BatchPlan.of(cfg, accelerator.num_processes)
    batch.check_fits(cfg, len(train_split))
    train_loader, train_order = make_loader(train_split, cfg, batch, train=True)
    test_loader, _ = make_loader(test_split, cfg, batch, train=False)
    parallel = make_parallelism(cfg, accelerator)
    set_seed(cfg.seed)  # the same initial weights on every rank
    model = parallel.split(build_model(cfg, accelerator.device))
    lr = batch.lr(cfg)
    optimizer = make_optimizer(cfg, model, lr)
    ema = None
    if cfg.ema_decay is not None:
        average = parallel.split(build_model(dataclasses.replace(cfg, compile=False), accelerator.device))
        ema = WeightEMA(model, average, cfg.ema_decay)
    if parallel.uses_ddp:
        model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    else:  # fsdp shards the model itself: Accelerate adds mixed precision's autocast, not DDP
        model = accelerator.prepare_model(model, evaluation_mode=True)
        optimizer, train_loader, test_loader = accelerator.prepare(optimizer, train_loader, test_loader)
    if ema is not None:  # evaluated under the same autocast as the model, without a DDP wrapper
        ema.average = accelerator.prepare_model(ema.average, evaluation_mode=True)
    set_seed(cfg.seed, device_specific=True)  # and a dropout stream of its own
    return Parts(cfg, accelerator, run_dir, progress, train_split, test_split, train_loader, train_order,
                 test_loader, model, optimizer, parallel, ema, batch, lr)


def restore(run: Parts) -> tuple[TrainState, Path | None]:
    """The state to start from: the checkpoint --resume chooses, checked against this run's model, optimizer and
    options, then loaded into the model, the optimizer, the gradient scaler, the weight average and every
    rank's RNG (each rank reads the same files and so makes the same choice); or a fresh state. Returns the
    state and the checkpoint it came from (None for a fresh state)."""
    cfg, accelerator, log = run.cfg, run.accelerator, run.progress.log
    state = TrainState()
    expected = Expected.of(run.signature, accelerator.unwrap_model(run.model))
    loaded = find_resume_checkpoint(run.dir, cfg.resume, log, expected)
    keep_clear_of_newer_checkpoints(run, loaded["trainer_state"]["step"] if loaded else 0)
    if loaded is None:
        return state, None
    saved = loaded["trainer_state"]
    for change in resume_changes(saved["config"], cfg, mid_epoch=saved["position"] > 0, checkpoint=loaded["path"]):
        log(f"resume: {change} from step {saved['step']}")
    run.parallel.load_full_state_dict(run.model, loaded["model"])
    settings = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    run.parallel.load_full_optimizer_state(run.optimizer, run.model, loaded["optimizer"])
    for group, ours in zip(run.optimizer.param_groups, settings):
        group.update(ours)  # this run's weight decay, momentum...: the saved state, today's options
    if "scaler" in loaded and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(loaded["scaler"])
    if run.ema is not None:
        if "ema" in loaded:
            run.parallel.load_full_state_dict(run.ema.average, loaded["ema"])
        else:
            run.ema.restart()
            log("note: the checkpoint has no weight average; --ema-decay starts one from its weights")
    saved_rng = loaded["rng_states"]
    if accelerator.process_index < len(saved_rng):
        set_rng_state(saved_rng[accelerator.process_index])
    if len(saved_rng) != accelerator.num_processes:
        log(f"note: the checkpoint was made by {len(saved_rng)} process(es), this run has {accelerator.num_processes}: "
            f"the data continues from the same sample, dropout streams are re-seeded where missing")
    state.load_state_dict(saved)
    log(f"resumed from {loaded['path']} at step {state.step} (epoch {state.epoch + 1}, sample {state.position} of "
        f"{len(run.train_split)})")
    return state, loaded["path"]


def keep_clear_of_newer_checkpoints(run: Parts, start_step: int) -> None:
    """A run that starts afresh (--resume none) or from an older step (--resume PATH) in a directory that holds
    newer checkpoints would mix its checkpoints with them, and retention (by step) would delete its own: refused,
    or with --move-old-checkpoints the old run is moved aside first. (--resume auto starts from the newest valid
    one; newer, damaged ones are replaced as the run reaches their steps.)"""
    newer = [c for c in list_checkpoints(run.dir) if checkpoint_step(c) > start_step]
    if not newer or run.cfg.resume == "auto":
        return
    if not run.cfg.move_old_checkpoints:
        raise ConfigError(f"output directory {run.dir} holds checkpoints up to {newer[-1].name}, past the step this "
                          f"run starts from ({start_step}): its checkpoints would mix with them and retention would "
                          f"delete them; choose another --output-dir, or add --move-old-checkpoints to move the old "
                          f"run aside")
    moved = on_main_process(run.accelerator, run.dir.move_old_run_aside, "moving the old run aside")
    run.progress.log(f"moved the earlier run's checkpoints, events and results to {moved}")


def start(parts: Parts, state: TrainState, resumed_from: Path | None) -> Run:
    """The run from `state` on: when things happen and the learning rate of every step of --epochs; config.yaml,
    the trackers, the monitor, the profiler, the progress bar and the run's first log lines."""
    cfg, accelerator, log = parts.cfg, parts.accelerator, parts.progress.log
    schedule = Schedule.plan(cfg, len(parts.train_split), parts.batch, state)

    def prepare_run_files():
        save_yaml(cfg, parts.dir.config)
        wait_to_sort_after_earlier_events(parts.dir.tensorboard)

    on_main_process(accelerator, prepare_run_files, "writing config.yaml")
    open_trackers(accelerator, cfg, parts.dir, start_step=state.step, log=log)
    stats = StepStats(accelerator, start_step=state.step, pending=state.pending_train_sums)
    train_step = TrainStep(parts.model, parts.optimizer, accelerator, parts.parallel, stats,
                           label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip)
    effective = {"per_process_batch": parts.batch.per_process, "global_batch": parts.batch.global_batch,
                 "lr": parts.lr}
    monitor = make_monitor(accelerator, cfg, effective, state.step, parts.dir, log=log)
    profiler = (StepProfiler(cfg.profile_steps, parts.dir, accelerator.process_index, log) if cfg.profile_steps
                else NoProfiler())
    run = Run(**parts.by_name(), resumed_from=resumed_from, schedule=schedule,
              lr_schedule=LRSchedule.plan(cfg, parts.lr, schedule.steps_per_epoch), stats=stats,
              train_step=train_step, stragglers=StragglerWatch(cfg.straggler_factor), monitor=monitor,
              profiler=profiler)
    run.progress.start(total=schedule.total_steps, initial=state.step)
    log_start(run)
    return run


def log_start(run: Run) -> None:
    """The run's first log lines: where, on what, how it optimizes, and how DDP took its options."""
    cfg, accelerator, world, batch = run.cfg, run.accelerator, run.accelerator.num_processes, run.batch
    run.progress.log(f"run directory {run.dir} | {world} process(es), {accelerator.distributed_type.value}, "
                     f"mixed precision {accelerator.mixed_precision} | {len(run.train_split)} train / "
                     f"{len(run.test_split)} test samples, global batch {batch.global_batch}, "
                     f"{run.schedule.total_steps} steps | parallelism {run.parallel.describe()}")
    run.progress.log(describe_optimization(run))
    if world > 1 and cfg.global_batch_size is None and cfg.lr_scaling == "none":
        run.progress.log(f"note: global batch {batch.global_batch} ({batch.per_process} per process x {world} "
                         f"processes{f' x {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''}); the "
                         f"learning rate was not scaled for it (--global-batch-size or --lr-scaling keep results "
                         f"comparable across process counts)")
    if isinstance(run.model, torch.nn.parallel.DistributedDataParallel):  # the DDP options as the wrapper took them
        run.progress.log(f"DDP: gradient buckets of {run.model.bucket_bytes_cap / 2**20:g} MB, "
                         f"gradient_as_bucket_view {run.model.gradient_as_bucket_view}, gradients all-reduced in "
                         f"{'fp32' if cfg.ddp_comm_hook == 'none' else cfg.ddp_comm_hook}")


def describe_optimization(run: Run) -> str:
    """One log line: the optimizer, its learning rate and schedule, and the regularization in use."""
    cfg, lr = run.cfg, run.lr_schedule
    scaled = "" if cfg.lr_scaling == "none" else (f" (--lr {cfg.lr:g} scaled {cfg.lr_scaling} from batch "
                                                  f"{cfg.lr_reference_batch} to {run.batch.global_batch})")
    extras = [f"{name} {value:g}" for name, value in (
        ("weight decay", cfg.weight_decay), ("grad clip", cfg.grad_clip or 0), ("label smoothing", cfg.label_smoothing),
        ("EMA decay", cfg.ema_decay or 0)) if value]
    implementation = optimizer_implementation(cfg, run.accelerator.device)
    return (f"optimizer {cfg.optimizer} ({implementation}), learning rate {run.lr:g}{scaled}, {lr.kind} schedule over {lr.total_steps} "
            f"steps with {lr.warmup_steps} warmup steps{f' to {lr.min_lr:g}' if lr.kind != 'constant' else ''}"
            f"{', ' + ', '.join(extras) if extras else ''}, dropout {cfg.dropout:g}")


# ----------------------------------------------------------------------------- the loop

def train_epoch(run: Run, state: TrainState, preemption: PreemptionFlag, hooks: DebugHooks) -> str:
    """Train from state.position to the end of the epoch, or to the run's last step. Returns "preempted" when a
    preemption signal on any rank stopped it (every rank stops at the same step), else "trained"."""
    run.train_order.set_position(state.epoch, state.position)
    run.stats.start_epoch()
    outcome = "trained"
    for batch in run.stats.timed(run.train_loader):
        step = state.step + 1  # the optimizer step this micro-batch belongs to
        run.profiler.before(step)
        hooks.before_micro_batch(state.epoch, step, batch)
        run.monitor.show_inputs(batch, state.epoch, state.step)
        set_learning_rate(run.optimizer, run.lr_schedule.lr(state.applied_steps))
        inputs, labels = training_input(batch, run.cfg, state.epoch)
        end = run.train_step(inputs, labels, StepAsks(
            stop_requested=preemption.received is not None,
            checkpoint_due=run.schedule.checkpoint_due(time.monotonic() - run.last_save),
            measure_grad_norm=run.schedule.should_log(step)))
        state.position += run.batch.micro_samples
        if end is None:  # inside a gradient-accumulation group
            continue
        if end.nonfinite_ranks:
            stop_on_nonfinite_loss(run, step, end.nonfinite_ranks)
        state.step = step
        run.profiler.after(step)
        if end.applied:  # not a step fp16's gradient scaler skipped: the schedule and the average move on
            state.applied_steps += 1
            if run.ema is not None:
                run.ema.update()
        run.progress.step_done()
        hooks.after_step(step, run.parallel.replicated_parameters(run.model))
        if run.cfg.consistency_every and step % run.cfg.consistency_every == 0:
            check_replicas_agree(run.accelerator, run.parallel, run.model, step)
        if run.schedule.should_log(step):
            log_training(run, state, end.grad_norm)
        if run.schedule.is_last(step):
            if end.stop_requested:  # only the evaluation is left: finishing beats a checkpoint and a requeue
                run.progress.log(f"got {preemption.received or 'a stop signal on another rank'} at the last step: "
                                 f"finishing the run instead of stopping it")
            break
        if end.stop_requested:
            outcome = "preempted"
            break
        if run.schedule.should_checkpoint(step, state.position, time_due=end.checkpoint_due):
            save(run, state)
    run.stats.end_epoch()  # the epoch, or the part of it this launch trained
    return outcome


@phase("gathering a log point's figures")
def log_training(run: Run, state: TrainState, grad_norm: torch.Tensor) -> None:
    """A log point, on every rank: the training figures since the previous one, global over all ranks."""
    values = run.stats.collect(state.step)
    values.update({"train/lr": run.optimizer.param_groups[0]["lr"], "train/grad_norm": float(grad_norm)})
    state.last_train_loss = values["train/loss"]
    run.monitor.log_train(state.step, state.epoch, values)
    run.progress.show_training(state.epoch, state.step, run.schedule.total_steps, values)
    warning = run.stragglers.observe(state.step, run.stats.local_by_rank)
    if warning:
        run.progress.log(warning)


def stop_on_nonfinite_loss(run: Run, step: int, ranks: list[int]) -> None:
    """Every rank stops at the step in which some rank's loss was NaN/inf; the update was not applied."""
    checkpoints = list_checkpoints(run.dir)
    message = (f"the loss became NaN/inf at step {step} on rank(s) {', '.join(map(str, ranks))}; the step was not "
               f"applied. The learning rate (--lr {run.cfg.lr:g}) is likely too high for Adam. Last good checkpoint: "
               f"{checkpoints[-1] if checkpoints else 'none yet'}; resume from it with a lower --lr")
    run.monitor.diverged(message, step)
    raise TrainingDiverged(message)


@phase("the evaluation")
def evaluate_run(run: Run) -> dict:
    """Exact evaluation of the model on the whole test set; with --ema-decay, of the weight average, and
    the weights' own accuracy and loss as raw_test_acc and raw_test_loss."""
    results = evaluate(run.ema.average if run.ema else run.model, run.test_loader, run.accelerator,
                       run.cfg.image_size)
    if run.ema is not None:
        raw = evaluate(run.model, run.test_loader, run.accelerator, run.cfg.image_size)
        results.update(raw_test_acc=raw["test_acc"], raw_test_loss=raw["test_loss"])
    return results


def evaluate_and_log(run: Run, state: TrainState) -> dict:
    """Exact evaluation on the whole test set, into TensorBoard and the log; the best accuracy so far updated."""
    results = evaluate_run(run)
    run.monitor.log_epoch(state.step, run.stats.epoch_seconds[-1], results, run.test_split)
    where = (f"end of epoch {state.epoch}" if state.position == 0
             else f"epoch {state.epoch + 1}, sample {state.position}")
    run.progress.log(f"step {state.step} ({where}) | test loss {results['test_loss']:.4f} "
                     f"acc {results['test_acc']:.4f} ({results['test_correct']}/{results['test_samples']})")
    state.record_test_acc(results["test_acc"])
    return results


@phase("saving a checkpoint")
def save(run: Run, state: TrainState, test_acc: float | None = None) -> Path:
    """Checkpoint the state at its step, with `test_acc` when the step was just evaluated. Every rank calls it:
    the RNG states and the pending training sums are gathered, rank 0 writes, every rank gets the path or
    the error."""
    accelerator = run.accelerator
    state.pending_train_sums = run.stats.pending()
    rng_states = gather_object([rng_state()])
    # the full, unsharded state (under --parallelism hybrid every rank takes part in gathering the shards)
    contents = {"model": run.parallel.full_state_dict(run.model),
                "optimizer": run.parallel.full_optimizer_state(run.optimizer, run.model), "rng_states": rng_states}
    if accelerator.scaler is not None:
        contents["scaler"] = accelerator.scaler.state_dict()
    if run.ema is not None:
        contents["ema"] = run.parallel.full_state_dict(run.ema.average)

    def write() -> Path:
        trainer_state = {**state.state_dict(), "test_acc": test_acc, "world_size": accelerator.num_processes,
                         "signature": run.signature, "config": run.cfg.to_dict()}
        return save_checkpoint(run.dir, state.step, contents, trainer_state, run.cfg.keep_checkpoints,
                               protect=run.resumed_from)

    path = on_main_process(accelerator, write, "writing a checkpoint")
    run.last_save = time.monotonic()
    run.progress.log(f"saved checkpoint {path}")
    return path


# ----------------------------------------------------------------------------- after the loop

def stop_for_preemption(run: Run, state: TrainState, preemption: PreemptionFlag) -> dict:
    """Save where every rank stopped, requeue the Slurm job when asked to, and end the run."""
    path = save(run, state)
    run.progress.close()
    run.progress.log(f"preempted at step {state.step} by {preemption.received or 'a signal on another rank'}: "
                     f"saved {path}; continue with --resume auto")
    if should_requeue(run.cfg):
        on_main_process(run.accelerator, lambda: requeue_slurm_job(run.progress.log), "requeueing the Slurm job")
    run.accelerator.end_training()
    return {"preempted": True, "steps": state.step, "checkpoint": str(path)}


@phase("the end of the run")
def finish(run: Run, state: TrainState, results: dict, started: float) -> dict:
    """The final metrics: metrics.json, the report and TensorBoard's summary, written by rank 0; returned on
    every rank."""
    accelerator = run.accelerator
    run.progress.close()
    # DDP keeps every rank's copy of the replicated weights identical; record one checksum per rank so anyone can
    # verify it.
    replicated = run.parallel.replicated_parameters(run.model)  # (none under fsdp)
    checksum = torch.stack([p.detach().double().sum() for p in replicated]).sum().reshape(1) if replicated \
        else torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    checksums = accelerator.gather(checksum).tolist()
    if len(set(checksums)) != 1:
        run.progress.log(f"WARNING: the ranks ended with different weights (parameter sums {checksums})")
    metrics = {
        "test_acc": results["test_acc"],
        "test_loss": results["test_loss"],
        "test_correct": results["test_correct"],
        "test_samples": results["test_samples"],
        "train_loss": state.last_train_loss,  # the last logged (None if nothing was logged yet)
        "steps": state.step,
        "epochs": state.epoch,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "train_images_per_sec": run.stats.images_per_sec(),  # None when this launch trained nothing
        "epoch_seconds": run.stats.epoch_seconds,
        "wall_seconds": time.perf_counter() - started,
        "param_checksums": checksums,
        "parallelism": run.parallel.name,
        "state_bytes_per_rank": state_bytes(accelerator.unwrap_model(run.model), run.optimizer)["total"],
    }
    if "raw_test_acc" in results:  # --ema-decay: the test figures above are the average's
        metrics.update(raw_test_acc=results["raw_test_acc"], raw_test_loss=results["raw_test_loss"])
    run.monitor.finish(metrics)  # flushes the event files the report is built from
    report = on_main_process(accelerator, lambda: write_results(run.dir, metrics, "tensorboard" in run.cfg.trackers()),
                             "writing the results")
    speed = metrics["train_images_per_sec"]
    run.progress.log(f"test accuracy {metrics['test_acc']:.4f} | "
                     f"{f'{speed:.0f} images/s' if speed is not None else 'nothing left to train'} "
                     f"| metrics: {run.dir.metrics} | report: {report}")
    if "tensorboard" in run.cfg.trackers():
        run.progress.log(f"watch it: tensorboard --logdir {run.dir.tensorboard}")
    accelerator.end_training()
    return metrics


def write_results(run_dir: RunDir, metrics: dict, report: bool = True) -> Path | str:
    """metrics.json and, from the TensorBoard events, the end-of-run report (rank 0); a failed write (a full disk)
    is one line for every rank."""
    try:
        write_metrics(run_dir.metrics, metrics)
        if not report:
            return "none (it is built from TensorBoard's events: --report-to tensorboard)"
        return write_report(run_dir)
    except OSError as err:
        raise ConfigError(f"could not write {err.filename or run_dir} ({err.strerror or err}); training finished "
                          f"and its final checkpoint is saved: free space, then rerun with --output-dir {run_dir} "
                          f"--resume auto to write the results (it resumes from that checkpoint and only "
                          f"evaluates)") from None

