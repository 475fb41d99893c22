"""The run directory: every path in it, the lock that keeps it to one run, and metrics.json.

    <run_dir>/
      config.yaml          the run's options (train)
      checkpoints/         step_NNNNNN/ (their files: checkpoint.CHECKPOINT_FILES) and best, a link to one
      tensorboard/         the event files (monitor)
      trackers.json        the MLflow and W&B runs a resume continues (monitor)
      mlflow.db            MLflow's store, when --report-to mlflow has no tracking URI
      wandb/               W&B's files (offline mode: all of its run)
      metrics.json         the final figures: METRICS below (train writes it; report and export read it)
      report.md, *.png     the end-of-run report and its figures (report)
      profile/rankR.json   --profile-steps traces (profiling)
      lr_find.json, .png   what `dist-alexnet lr-find` found (lr_find)
      old-<time>/          an earlier run moved aside (--move-old-checkpoints)
      .lock                held by rank 0 for the life of the run

Rank 0 writes every file of a run (the directory is meant to be on a shared file system); RunDir.choose and
RunDir.claim let every rank learn the name and whether the directory can be used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dist_alexnet.distributed import on_main_process
from dist_alexnet.errors import ConfigError

REPORT_FIGURES = ("loss.png", "accuracy.png", "throughput.png", "confusion_matrix.png", "class_accuracy.png",
                  "misclassified.png", "inputs.png")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tensorboard")
    config = property(lambda self: self.path / "config.yaml")
    trackers = property(lambda self: self.path / "trackers.json")
    mlflow_db = property(lambda self: self.path / "mlflow.db")
    wandb = property(lambda self: self.path / "wandb")
    metrics = property(lambda self: self.path / "metrics.json")
    report = property(lambda self: self.path / "report.md")
    lr_find_json = property(lambda self: self.path / "lr_find.json")
    lr_find_plot = property(lambda self: self.path / "lr_find.png")
    lock_file = property(lambda self: self.path / ".lock")

    def figure(self, name: str) -> Path:
        assert name in REPORT_FIGURES, name
        return self.path / name

    def profile(self, rank: int) -> Path:
        return self.path / "profile" / f"rank{rank}.json"

    def results(self) -> list[Path]:
        """What a run leaves besides its lock: moved aside together when a new run starts here."""
        return [self.checkpoints, self.tensorboard, self.metrics, self.report, self.config, self.trackers,
                *(self.figure(name) for name in REPORT_FIGURES)]

    # ------------------------------------------------------------------------- for a training run

    @classmethod
    def choose(cls, output_dir: str | None, accelerator) -> RunDir:
        """--output-dir, else runs/<timestamp> as rank 0 names it (ranks may start a second apart); the
        Accelerator's trackers then write into it."""
        name = on_main_process(accelerator, lambda: output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}",
                               "naming the run directory")
        accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = name
        return cls(Path(name))

    def claim(self, accelerator) -> RunDirLock | None:
        """Before any work: rank 0 creates the directory, writes a file in it, checks that checkpoints/ and
        tensorboard/ are directories if they exist, and takes the lock; every rank learns the outcome, so a bad or
        busy --output-dir fails in seconds with one line instead of at the first checkpoint. Returns the lock on
        rank 0, None on the others."""
        lock = RunDirLock(self) if accelerator.is_main_process else None

        def claim():
            problem = self._write_problem() or self._entry_problem()
            if problem:
                raise ConfigError(f"output directory {self} is not writable ({problem}); choose another --output-dir")
            lock.acquire()

        on_main_process(accelerator, claim, "checking the output directory")
        return lock

    def _write_problem(self) -> str | None:
        """Why the directory cannot be created or written to (a small file created, synced and removed), or None."""
        probe = self.path / f".write-test-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
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
            blocker = next((p for p in (self.path, *self.path.parents) if os.path.exists(p) and not os.path.isdir(p)),
                           None)
            return f"{blocker} is a file, not a directory" if blocker else err.strerror or str(err)
        return None

    def _entry_problem(self) -> str | None:
        """Why the directory's own subdirectories cannot be used (one is a file, a dangling link, a link loop)."""
        for path in (self.checkpoints, self.tensorboard):
            if os.path.lexists(path) and not os.path.isdir(path):
                kind = "a link to nowhere or to itself" if os.path.islink(path) else "a file"
                return f"{path} is {kind}, not a directory"
        return None

    def move_old_run_aside(self) -> Path:
        """Move an earlier run's checkpoints, events and results into old-<time>/ (rank 0 only). trackers.json
        too: the MLflow and W&B runs it names hold the old run's figures, so the new run starts its own."""
        target = self.path / f"old-{datetime.now():%Y%m%d-%H%M%S}"
        target.mkdir()
        for path in self.results():
            if os.path.lexists(path):
                os.rename(path, target / path.name)
        return target


class RunDirLock:
    """One run directory, one writer: an exclusive lock (flock) on <run_dir>/.lock for the life of the run, held
    by rank 0. The kernel drops it when the holder's process ends in any way, kill -9 included. On a network
    file system it needs working flock: NFSv4 and NFSv3 with lockd (Linux emulates flock with POSIX locks
    there), Lustre mounted with -o flock (not localflock), GPFS. The file records the holder, for the message
    the next run gets."""

    SAME_JOB_WAIT = 120  # seconds a restarted or requeued run of the same job waits for the old one to be gone

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.lock_file
        self.fd = None

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.SAME_JOB_WAIT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                if holder.get("job") and holder.get("job") == _job_id() and time.monotonic() < deadline:
                    time.sleep(0.5)  # the previous attempt of this job is still shutting down
                    continue
                os.close(self.fd)
                self.fd = None
                who = ", ".join(f"{key} {holder[key]}" for key in ("host", "pid", "job", "started") if holder.get(key))
                raise ConfigError(f"output directory {self.path.parent} is in use by another run ({who or 'unknown'}): "
                                  f"two runs would mix their checkpoints and TensorBoard events; wait for it to end, "
                                  f"or choose another --output-dir")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
                                      "started": datetime.now().isoformat(timespec="seconds")}).encode())

    def _holder(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.path.read_text() or "{}")
        return {}

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _job_id() -> str | None:
    """The Slurm job this process belongs to: its requeues share the id. (A launcher's restarts need no id: it
    starts the new processes once the old ones are gone.)"""
    return os.environ.get("SLURM_JOB_ID")


def write_atomically(path: Path, content: str | bytes) -> None:
    """A temporary file in the same folder renamed over `path`: a reader sees the old file or the new one, never
    a part, and a failed write (a full disk, a file size limit, a signal) leaves the old one as it was and no
    temporary behind. The rule for every single file the project writes (metrics.json, trackers.json, reports,
    figures, JSON results); checkpoints and exports have their own, by directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:  # a signal turned into an exception, Ctrl-C
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ----------------------------------------------------------------------------- metrics.json

# Every field of metrics.json and what it holds.
METRICS = {
    "test_acc": "exact accuracy on the whole test set (with --ema-decay: of the weight average)",
    "test_loss": "mean cross-entropy on the test set",
    "test_correct": "test images classified right",
    "test_samples": "test images evaluated",
    "train_loss": "the training loss at the last log point (null if nothing was logged)",
    "steps": "optimizer steps taken",
    "epochs": "epochs completed",
    "world_size": "processes",
    "distributed_type": "Accelerate's distributed type (NO, MULTI_GPU, MULTI_CPU)",
    "mixed_precision": "no, fp16 or bf16",
    "train_images_per_sec": "training images per second of this launch (null when it trained nothing)",
    "epoch_seconds": "each epoch's (or part epoch's) training time in this launch",
    "wall_seconds": "the launch's time, set-up included",
    "param_checksums": "each rank's sum of the replicated weights (equal when the ranks agree)",
}
OPTIONAL_METRICS = {
    "raw_test_acc": "with --ema-decay: the weights' own test accuracy",
    "raw_test_loss": "with --ema-decay: the weights' own test loss",
    # always written; optional so that the metrics.json of runs made before them still reads
    "parallelism": "ddp, hybrid or fsdp",
    "state_bytes_per_rank": "rank 0's parameters, gradients and optimizer state in bytes (what --parallelism "
                            "spreads over the ranks; activations aside)",
}


def write_metrics(path: Path, metrics: dict) -> None:
    """metrics.json: strict JSON (a NaN becomes null), written atomically."""
    unknown = set(metrics) - set(METRICS) - set(OPTIONAL_METRICS)
    missing = set(METRICS) - set(metrics)
    assert not unknown and not missing, (unknown, missing)

    def finite(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    write_atomically(path, json.dumps({k: [finite(v) for v in value] if isinstance(value, list) else finite(value)
                                       for k, value in metrics.items()}, indent=2, allow_nan=False) + "\n")


def read_metrics(path: Path) -> dict | None:
    """metrics.json as the trainer writes it, or None: missing, unreadable, cut short, or not its shape."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and all(key in metrics for key in METRICS) else None
