"""What a run reports: scalars to every tracker --report-to names (TensorBoard, MLflow, W&B, through
Accelerate's trackers), and into TensorBoard also images, text and hyperparameters.

Monitor runs on rank 0. The other ranks get a NullMonitor whose hooks do nothing, so the training loop calls
the same hooks on every rank without rank checks. The values come from the loop (dist_alexnet/stats.py
measures them); the monitor only writes them and watches for a run stuck at chance. TAGS lists every tag
written and what it means (the README's table is the same list).

A resumed run goes on in the same tracker runs: TensorBoard's event files in <run dir>/tensorboard (purging
what the interrupted run logged after its checkpoint), the MLflow run and the W&B run whose ids
<run dir>/trackers.json keeps, along with the last step sent to them; steps up to that one are not sent
again (an exact resume recomputes the same values).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import time
import uuid
from pathlib import Path

import yaml
from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.plugins.text.summary_v2 import text_pb
from torchvision.utils import make_grid

from dist_alexnet.config import figures_depend_on, readable, readable_options
from dist_alexnet.datasets import CLASS_NAMES, MEAN, STD
from dist_alexnet.distributed import on_main_process
from dist_alexnet.errors import ConfigError, Interrupted, first_line
from dist_alexnet.figures import (CHANCE_ACC, CHANCE_LOSS, class_accuracy_figure, confusion_matrix_figure,
                                  misclassified_figure, to_rgb)
from dist_alexnet.inputs import training_input
from dist_alexnet.preemption import requeue_slurm_job, should_requeue, stop_at_once_on_preemption
from dist_alexnet.provenance import launch_command
from dist_alexnet.rundir import RunDir, write_atomically

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
    "train/lr": "the learning rate of that step (warmup and schedule included)",
    "train/grad_norm": "L2 norm of the whole gradient at that step (after DDP averaging, before any clipping "
                       "and the update)",
    "train/loss_scale": "fp16 only: the gradient scaler's loss scale (drops when gradients overflow)",
    "test/loss": "mean cross-entropy over the whole test set, after each epoch",
    "test/acc": "accuracy over the whole test set (every sample counted once), after each epoch",
    "test/class_acc/<class>": "accuracy on the test images of one class, after each epoch",
    "test/raw_acc": "--ema-decay only: the training weights' own test accuracy (test/acc is the average's)",
    "test/raw_loss": "--ema-decay only: the training weights' own test loss (test/loss is the average's)",
    "perf/images_per_sec": "training images per second, all processes together",
    "perf/images_per_sec_per_device": "the same divided by the number of processes",
    "perf/step_time_ms": "wall time per optimizer step, averaged since the previous point",
    "perf/data_wait_fraction": "share of that time spent waiting for the next input batch (mean over ranks); "
                               "near 0 = the model is the bottleneck, near 1 = the input pipeline is",
    "perf/rank_local_ms_min": "the fastest rank's local work per step (input, forward, loss: what waits for no "
                              "other rank), in ms since the previous point (health.StragglerWatch)",
    "perf/rank_local_ms_median": "the median rank's local work per step, ms",
    "perf/rank_local_ms_max": "the slowest rank's local work per step, ms: far above the minimum, a straggler",
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
EMA_ONLY_TAGS = ("test/raw_acc", "test/raw_loss")
FP16_ONLY_TAGS = ("train/loss_scale",)
WARNING_TAGS = ("warnings/divergence",)


def loss_scale_note(before: float | None, after: float, first_step: int, last_step: int) -> str | None:
    """fp16, at a log step: a loss scale lower than at the previous one means GradScaler found inf/NaN gradients
    in steps first_step..last_step, skipped those updates and lowered the scale. That is how it finds the largest
    safe scale: a note, not an error (a NaN/inf *loss* is what stops training)."""
    if before is None or after >= before:
        return None
    steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    return (f"note: fp16 gradient overflow in {steps}: GradScaler skipped step(s) and lowered the loss scale "
            f"from {before:g} to {after:g} (normal early in fp16 training; not an error)")


def wait_to_sort_after_earlier_events(folder: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second its writer was
    created (then host and pid): a resumed run's writer created in the same second as the previous one's (a
    quick restart) could sort before it, and its purge of the steps after the checkpoint would then hide its
    own. Wait until the clock is past the newest existing file's second (at most a second, and only then)."""
    seconds = [int(part) for part in (p.name.split(".")[3] for p in Path(folder).glob("events.out.tfevents.*"))
               if part.isdigit()]
    if seconds:
        time.sleep(max(0.0, max(seconds) + 1 - time.time()))


# trackers.json: what a resume needs to continue the tracker runs (Monitor writes it, open_trackers reads it).
TRACKER_STATE_FIELDS = {
    "mlflow_run_id": "the MLflow run this run's figures go to",
    "wandb_run_id": "the W&B run this run's figures go to",
    "last_step": "the last step sent to them",
    "history_of": "the options their figures were computed with (history_options)",
}


def open_trackers(accelerator, cfg, run_dir: Path, start_step: int, log=print) -> None:
    """Start the trackers --report-to names, on rank 0 (Accelerate starts none elsewhere); a run that resumes
    (start_step > 0) continues their runs. Every rank calls it. A tracker that does not answer within
    --tracker-timeout stops the run with one line naming where it was to write; so does a preemption signal
    meanwhile (waiting for the first training step could take that long)."""
    run_dir = RunDir(run_dir)
    names = cfg.trackers()
    main = accelerator.is_main_process
    saved = read_tracker_state(run_dir, log if main and set(names) - {"tensorboard"} else None) if start_step else {}
    abandoned = abandoned_history(saved, cfg, accelerator.num_processes, start_step)
    if abandoned:  # TensorBoard purges those steps; MLflow and W&B cannot, so they continue in new runs
        if main and set(names) - {"tensorboard"}:
            copied = f" (MLflow's starts with the old run's steps up to {start_step})" if "mlflow" in names else ""
            log(f"note: the MLflow/W&B runs of this directory hold steps up to {saved['last_step']} trained with "
                f"other options ({abandoned}); resumed from step {start_step}, this launch continues in new runs of "
                f"theirs{copied}; the old runs stay as they were")
        saved = {"continues": {key: value for key, value in saved.items() if key.endswith("_run_id")}}
    trackers, where = [], {}
    for name in names:
        if name == "tensorboard":  # Accelerate's tracker writes into <logging_dir>/<run name>: RunDir.tensorboard
            purge = {"purge_step": start_step + 1} if start_step else {}
            trackers.append(TensorBoardTracker(RunDir(run_dir).tensorboard.name, run_dir, **purge))
        elif name == "mlflow":
            where["mlflow"] = mlflow_tracking_uri(run_dir, log if accelerator.is_main_process else None)
            trackers.append(MLflowTracker("dist-alexnet", run_id=saved.get("mlflow_run_id"), run_name=run_dir.path.name))
        elif name == "wandb":  # WANDB_MODE=offline keeps it on disk, in <run_dir>/wandb
            import wandb  # an optional extra ([wandb]), imported only when asked for

            where["wandb"] = (f"{run_dir.wandb} (offline)" if os.environ.get("WANDB_MODE") in ("offline", "dryrun")
                              else os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
            trackers.append(WandBTracker("dist-alexnet", id=saved.get("wandb_run_id") or uuid.uuid4().hex[:12],
                                         resume="allow", dir=str(run_dir), name=run_dir.path.name,
                                         settings=wandb.Settings(init_timeout=cfg.tracker_timeout)))
    accelerator.log_with = trackers

    def start():
        try:
            with stop_at_once_on_preemption("the trackers were starting"), mlflow_request_limits(cfg.tracker_timeout):
                accelerator.init_trackers("dist-alexnet")
                old_run = saved.get("continues", {}).get("mlflow_run_id")
                if old_run and "mlflow" in names:
                    copy_mlflow_history(old_run, accelerator.get_tracker("mlflow", unwrap=False), start_step)
        except Interrupted:
            if should_requeue(cfg):
                requeue_slurm_job(log)
            raise
        except Exception as err:  # the trackers' own errors: a store that refuses, a bad URI, no answer, no login
            targets = ", ".join(f"{name} at {uri}" for name, uri in where.items())
            raise ConfigError(f"--report-to {cfg.report_to}: a tracker could not start ({targets}; "
                              f"{type(err).__name__}: {first_line(err, 200)}); check that it is reachable (each "
                              f"request may take --tracker-timeout {cfg.tracker_timeout:g} s), or leave it out of "
                              f"--report-to") from None

    on_main_process(accelerator, start, "starting the trackers")


def history_options(cfg, world_size: int) -> dict:
    """What the figures sent to the trackers depend on: the options marked so in TrainConfig (history=True) and
    the processes."""
    options = {key: value for key, value in cfg.to_dict().items() if key in figures_depend_on()}
    return {**options, "world_size": world_size}


def abandoned_history(saved: dict, cfg, world_size: int, start_step: int) -> str | None:
    """Whether the trackers hold steps past `start_step` that this launch will not recompute as they are (it trains
    them with other options): the options that differ, named; None when the steps they hold stay true."""
    if start_step >= saved.get("last_step", 0):
        return None
    before, now = saved.get("history_of"), history_options(cfg, world_size)
    if not isinstance(before, dict):
        return "not recorded"
    changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in now.items() if before.get(key) != value]
    return ", ".join(changed) or None


def copy_mlflow_history(old_run_id: str, tracker, last_step: int) -> None:
    """The new MLflow run starts with the old run's metrics up to `last_step`, so that its history is the run's."""
    from mlflow.tracking import MlflowClient  # an optional extra ([mlflow]), imported only when asked for

    client, new_run_id = MlflowClient(), tracker.active_run.info.run_id
    for key in client.get_run(old_run_id).data.metrics:
        points = [m for m in client.get_metric_history(old_run_id, key) if m.step <= last_step]
        for start in range(0, len(points), 1000):  # MLflow's batch limit
            client.log_batch(new_run_id, metrics=points[start:start + 1000])
    client.set_tag(new_run_id, "dist_alexnet.continues_run", old_run_id)


def mlflow_tracking_uri(run_dir: Path, log) -> str:
    """Where MLflow writes: MLFLOW_TRACKING_URI, else a database in the run directory (MLflow's own default
    would be ./mlflow.db in whatever directory the job started in). `log` (rank 0) says which."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    database = RunDir(run_dir).mlflow_db.resolve()
    uri = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{database}"
    if log:
        log(f"MLflow: no MLFLOW_TRACKING_URI, so the run goes into {database} (see it with `mlflow ui "
            f"--backend-store-uri {uri}`)")
    return uri


@contextlib.contextmanager
def mlflow_request_limits(timeout: float):
    """While the trackers start: each MLflow request waits at most `timeout` seconds and is not retried (MLflow's
    defaults, 120 s and 7 retries with backoff, take 4.5 minutes to give up on a server that is down). Training's
    own requests keep MLflow's retries."""
    limits = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    before = {name: os.environ.get(name) for name in limits}
    os.environ.update(limits)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_tracker_state(run_dir: Path, log=None) -> dict:
    """trackers.json, or {} when there is none; one that cannot be read is said (`log`, rank 0): the resumed run's
    MLflow and W&B figures then go to new runs of theirs."""
    path = RunDir(run_dir).trackers
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        state, problem = None, f"it cannot be read ({first_line(err, 120)})"
    else:
        problem = "it does not hold a mapping"
    if isinstance(state, dict):
        return state
    if log:
        log(f"warning: {path} is damaged ({problem}): the MLflow and W&B runs this run was sending to are not known, "
            f"so this launch starts new ones (the old ones keep the figures up to the interruption)")
    return {}


def make_monitor(accelerator, cfg, effective: dict, start_step: int, run_dir: Path,
                 log=print) -> Monitor | NullMonitor:
    """Monitor on rank 0 (call after open_trackers), NullMonitor elsewhere."""
    if accelerator.is_main_process:
        return Monitor(accelerator, cfg, effective, start_step, run_dir, log)
    return NullMonitor()


class NullMonitor:
    """Ranks other than 0: the same hooks, doing nothing."""

    def show_inputs(self, batch, epoch, step):
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
        """With --report-to without tensorboard, every call does nothing."""
        tracker = next((t for t in accelerator.trackers if t.name == "tensorboard"), None)
        self.accelerator, self.log, self.failed = accelerator, log, tracker is None
        self.writer = tracker.writer if tracker else None
        if not getattr(threading.excepthook, "quiet_event_writer", False):
            threading.excepthook = _quiet_event_writer(threading.excepthook)

    def __getattr__(self, name: str):
        """add_scalar, add_image, flush: the SummaryWriter's, guarded (nothing without TensorBoard)."""
        if self.writer is None:
            return lambda *args, **kwargs: None
        return functools.partial(self._call, getattr(self.writer, name))

    def add_summary(self, summary, step: int) -> None:
        """A summary protobuf (text, hparams) into the same event file."""
        if self.writer is not None:
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
    """Rank 0: the scalars to every tracker, everything into the run's one TensorBoard event file."""

    def __init__(self, accelerator, cfg, effective: dict | None = None, start_step: int = 0,
                 run_dir: Path | None = None, log=print):
        """effective: what the options came to on this many processes (per_process_batch, global_batch, lr);
        start_step: the step the run starts from (0, or the step of the checkpoint it resumed from)."""
        self.accelerator, self.cfg, self.log = accelerator, cfg, log
        self.effective = effective or {}
        self.writer = EventWriter(accelerator, log)
        self.others = [t for t in accelerator.trackers if t.name != "tensorboard"]  # MLflow, W&B
        self.run_dir = Path(run_dir) if run_dir else None
        self.tracker_state = self._record_trackers(start_step)
        # the last step MLflow and W&B got before this launch: a resumed run does not send them a step twice
        self.sent_before = self.tracker_state.get("last_step", 0)
        self.wrote_inputs = False
        self.warned_chance = False
        # fp16: the loss scale at the previous log point (before the first step: the initial or resumed scale)
        self.loss_scale = float(accelerator.scaler.get_scale()) if accelerator.scaler is not None else None
        self.logged_step = start_step  # the previous log point (or the step the run started from)

        resolved = "".join(f"# {key}: {value}\n" for key, value in self.effective.items())
        self.text("run/config", _code(yaml.safe_dump(readable_options(cfg), sort_keys=False)
                                      + f"# effective on {accelerator.num_processes} process(es):\n{resolved}"))
        command, launcher = launch_command()
        self.text("run/command", _code(command))
        self.text("run/launcher", launcher)
        self._write_hparams()

    # --- hooks called by the training loop

    def show_inputs(self, batch, epoch: int, step: int) -> None:
        """The first training batch exactly as the model gets it, once, at the step the run starts from
        (augmentation depends only on seed, epoch and sample index, so computing it again gives the same
        images), un-normalized back to [0, 1] for display."""
        if self.wrote_inputs:
            return
        self.wrote_inputs = True
        inputs, _ = training_input(batch, self.cfg, epoch)
        images = (inputs[:32].detach().float().cpu() * STD + MEAN).clamp(0, 1)
        self.writer.add_image("inputs/train_batch", make_grid(images, nrow=8, pad_value=1.0), step)

    def log_train(self, step: int, epoch: int, values: dict) -> None:
        """At a log point: StepStats.collect()'s global values plus the loop's train/lr and train/grad_norm;
        epoch counts from 0."""
        values = dict(values)
        if self.accelerator.scaler is not None:
            scale = float(self.accelerator.scaler.get_scale())  # a sync, at log points only (collect() has one)
            note = loss_scale_note(self.loss_scale, scale, self.logged_step + 1, step)
            if note:
                self.log(note)
            values["train/loss_scale"] = self.loss_scale = scale
        self.logged_step = step
        self.log_scalars(values, step)
        self._check_chance_level(step, epoch, values)
        self.writer.flush()  # what is logged survives a kill -9

    def log_epoch(self, step: int, epoch_seconds: float, results: dict, test_split) -> None:
        """After each evaluation: test metrics, per-class accuracy, confusion matrix, misclassified images."""
        predictions, labels = results["predictions"], results["labels"]
        confusion, per_class = results["confusion_matrix"], results["per_class_acc"]
        values = {"test/loss": results["test_loss"], "test/acc": results["test_acc"],
                  **{class_tag(name): acc for name, acc in zip(CLASS_NAMES, per_class)},
                  "perf/epoch_seconds": epoch_seconds}
        if "raw_test_acc" in results:  # --ema-decay: test/* are the average's, these the weights' own
            values.update({"test/raw_acc": results["raw_test_acc"], "test/raw_loss": results["raw_test_loss"]})
        self.log_scalars(values, step)

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

    def log_scalars(self, values: dict, step: int) -> None:
        """What accelerator.log() does (every tracker gets the same values at the same step), tracker by tracker:
        a TensorBoard that fails (a full disk) is turned off without the others losing the point, and MLflow and
        W&B get no step twice after a resume (TensorBoard purges instead)."""
        values = {tag: float(value) for tag, value in values.items()}
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if self.others and step > self.sent_before:
            for tracker in self.others:
                tracker.log(values, step=step)
            self.tracker_state["last_step"] = step
            self._save_tracker_state()

    def _record_trackers(self, start_step: int) -> dict:
        """trackers.json: the MLflow and W&B run ids, the last step they were sent and the options their figures
        were computed with (history_options); the configuration goes to a tracker run once, when it starts."""
        if not self.others:
            return {}
        state = read_tracker_state(self.run_dir) if start_step else {}
        started = []  # trackers whose run began with this launch (open_trackers gave them no saved id)
        for tracker in self.others:
            run_id = tracker.active_run.info.run_id if tracker.name == "mlflow" else tracker.run.id
            if state.get(f"{tracker.name}_run_id") != run_id:
                started.append(tracker.name)
                tracker.store_init_configuration({**readable_options(self.cfg), **{f"effective_{k}": v
                                                                           for k, v in self.effective.items()}})
            state[f"{tracker.name}_run_id"] = run_id
        if len(started) == len(self.others):  # new runs only: they have nothing past the step the run starts from
            state["last_step"] = start_step
        state.setdefault("last_step", start_step)
        state["history_of"] = history_options(self.cfg, self.accelerator.num_processes)
        self.tracker_state = state
        self._save_tracker_state()
        return state

    def _save_tracker_state(self) -> None:
        assert set(self.tracker_state) <= set(TRACKER_STATE_FIELDS), self.tracker_state
        write_atomically(RunDir(self.run_dir).trackers, json.dumps(self.tracker_state) + "\n")

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_summary(text_pb(tag, readable(markdown)), step)

    def image(self, tag: str, figure, step: int) -> None:
        self.writer.add_image(tag, to_rgb(figure), step, dataformats="HWC")

    def _write_hparams(self) -> None:
        """HPARAMS tab: this run is one row (its config, and the last value of each HPARAM_METRICS tag).
        Written into the run's own event file (SummaryWriter.add_hparams would make a separate run)."""
        values = {k: v for k, v in readable_options(self.cfg).items() if v is not None}  # None has no hparam type
        values.update(world_size=self.accelerator.num_processes,
                      **{f"effective_{key}": value for key, value in self.effective.items()},
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

    def _check_chance_level(self, step: int, epoch: int, values: dict) -> None:
        """Warn once when, after the first epoch, the model is still at chance: accuracy within 5 points of 10% and
        a loss within STUCK_LOSS_MARGIN of ln 10 or above (ln 10 is the loss of a uniform guess: what Adam with lr
        1e-2 did in the reference tutorial; a far larger loss means the weights blew up). Non-finite losses stop
        training instead."""
        loss, acc = values["train/loss"], values["train/acc"]
        if (self.warned_chance or epoch < 1 or abs(acc - CHANCE_ACC) >= 0.05
                or loss < CHANCE_LOSS - STUCK_LOSS_MARGIN):
            return
        self.warned_chance = True
        message = (f"WARNING: training diverged or is stuck at chance: after {epoch} epoch(s) accuracy is "
                   f"{acc:.1%} (chance: 10%) and the training loss {loss:.4g} (a uniform guess: ln 10 = "
                   f"{CHANCE_LOSS:.3f}). {stuck_advice(self.cfg.optimizer, values.get('train/lr', self.cfg.lr))}")
        self.log(message)
        self.text("warnings/divergence", message, step)


# A run stuck at chance: its training loss is this close to ln 10 or above (a run that learns, however slowly, is
# further below within the first epoch; one stuck measures 2.30 give or take 0.005 per --log-every window).
STUCK_LOSS_MARGIN = 0.01
# The learning rates each optimizer usually trains AlexNet with (the reference run: Adam at 1e-3; the accurate preset:
# AdamW at 1.4e-3 before its sqrt scaling): above, a run stuck at chance most likely diverged; below, it barely moved.
USUAL_LR = {"adam": (1e-4, 3e-3), "adamw": (1e-4, 5e-3), "sgd": (1e-3, 0.5)}
OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def stuck_advice(optimizer: str, lr: float) -> str:
    """What to try for a run stuck at chance, from its learning rate (the one of its last step)."""
    low, high = USUAL_LR[optimizer]
    name, reference = OPTIMIZER_NAMES[optimizer], "1e-3" if optimizer != "sgd" else "0.01 to 0.1"
    if lr > high:
        return (f"Likely cause: the learning rate is too high for {name} (--lr {lr:g}); try {reference} "
                f"(the reference run uses Adam at 1e-3) or lower.")
    if lr < low:
        return (f"Likely cause: the learning rate is very low for {name} (--lr {lr:g}): the weights barely move; "
                f"try {reference} (the reference run uses Adam at 1e-3).")
    return (f"The learning rate (--lr {lr:g}) is in {name}'s usual range, so lowering it is unlikely to help: check "
            f"the labels and the inputs (TensorBoard's inputs/train_batch), --label-smoothing and --dropout, or train "
            f"longer.")


def _code(text: str) -> str:
    """Markdown code block (indented: TensorBoard's text plugin renders it verbatim)."""
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())
