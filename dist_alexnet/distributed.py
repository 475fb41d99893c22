"""Running on many processes: the Accelerator, and the few things one rank does for all of them.

Rank 0 writes every file of a run and chooses its name; the first process of each node loads (or
writes) the data before the others read it. Whatever one rank does for the others, every rank must
learn how it went: if only the failing rank stopped, the others would wait in their next collective
for the process-group timeout (30 minutes). on_main_process() and raise_if_any_rank_failed() are the
two ways of doing that, and the only ones used.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import time
import traceback
from datetime import datetime, timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DDPCommunicationHookType, DistributedDataParallelKwargs,
                              InitProcessGroupKwargs, broadcast_object_list, gather_object)

from dist_alexnet.config import TrainConfig, resolve_mixed_precision
from dist_alexnet.datasets import Split, load_data
from dist_alexnet.errors import (CheckpointError, CollectiveFailed, ConfigError, DataError, Interrupted, RankFailed,
                                 first_line)

# Errors that say what is wrong with the user's input or files: a rank that learns of one on another rank
# raises the same error, so that every rank prints the same one line.
SHARED_ERRORS = (ConfigError, DataError, CheckpointError, Interrupted)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator for cfg (precision, accumulation, DDP options, collective timeout), after checking that
    all the processes the launcher started joined one job."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # NCCL's watchdog: on a timed-out collective abort the communicators but leave the process alive (2, CleanUpOnly,
    # instead of torch's default 3, which kills the process from the watchdog thread without a word), so that the
    # waiting rank raises and is_collective_failure / collective_failed turn it into one line naming the collective;
    # and dump the flight recorder's ring of recent collectives (README: Crashes and hangs). A user's setting wins.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    try:
        accelerator = Accelerator(
            # Without CUDA, run on the CPU (gloo): Accelerate would otherwise leave the processes of
            # `accelerate launch --multi_gpu` or torchrun as independent single-process runs.
            cpu=not torch.cuda.is_available(),
            project_dir="runs",  # placeholder until choose_run_dir() sets the run directory
            mixed_precision=resolve_mixed_precision(cfg),
            gradient_accumulation_steps=cfg.grad_accum,
            # the trackers (--report-to) are opened by monitor.open_trackers once the run directory is known
            # Data order comes from EpochOrder (seed, epoch): Accelerate need not re-sync any RNG per epoch.
            rng_types=[],
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
            kwargs_handlers=[
                DistributedDataParallelKwargs(
                    bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=cfg.ddp_gradient_as_bucket_view,
                    comm_hook=DDPCommunicationHookType({"none": "no"}.get(cfg.ddp_comm_hook, cfg.ddp_comm_hook))),
                # how long a rank waits in a collective (and for the others to join) before it gives up
                InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout)),
            ],
        )
    except RuntimeError as err:  # the rendezvous timed out (torch.distributed's DistStoreError and the like)
        if not is_collective_failure(err):
            raise
        raise ConfigError(f"the {launched} processes the environment announces (WORLD_SIZE={launched}) did not all "
                          f"join within --collective-timeout {cfg.collective_timeout:g} s ({first_line(err)}); "
                          f"start them with a launcher, or unset WORLD_SIZE, RANK and MASTER_ADDR for one "
                          f"process") from None
    if accelerator.num_processes != launched:
        raise ConfigError(f"the launcher started {launched} processes but they did not join one job "
                          f"(each sees world size {accelerator.num_processes}); on a machine without GPUs "
                          f"export ACCELERATE_USE_CPU=1")
    return accelerator


# ----------------------------------------------------------------------------- when another rank is gone

# What a rank was doing when a collective failed: the innermost of these functions on its stack.
COLLECTIVE_PLACES = {
    "agree_on_step_end": "the per-step stop check",
    "clip_grad_norm_": "a training step",
    "backward": "a training step's gradient all-reduce",
    "_all_gather": "the classifier's tensor-parallel exchange (--parallelism hybrid)",
    "_reduce_scatter": "the classifier's tensor-parallel exchange (--parallelism hybrid)",
    "after_backward": "the classifier shards' gradient all-reduce (--parallelism hybrid)",
    "collect": "gathering a log point's figures",
    "pending": "gathering the training sums for a checkpoint",
    "save": "saving a checkpoint",
    "evaluate": "the evaluation",
    "on_main_process": "sharing the outcome of rank 0's file writes",
    "raise_if_any_rank_failed": "waiting for the data to load",
    "finish": "the end of the run",
    "check_replicas_agree": "the ranks' weight consistency check",
}


def is_collective_failure(error: BaseException) -> bool:
    """A failed or timed-out collective: torch.distributed's own errors, or what gloo and the store raise."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(mark in text for mark in (
        "Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo",
        "Watchdog caught collective operation timeout", "NCCL communicator was aborted", "NCCL error"))


def collective_failed(error: BaseException, accelerator: Accelerator, step: int, timeout: float) -> CollectiveFailed:
    """One line for a rank whose collective failed: where it was, the likely cause, what happens next."""
    frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    place = next((COLLECTIVE_PLACES[name] for name in reversed(frames) if name in COLLECTIVE_PLACES), "a collective")
    timed_out = "imed out" in str(error)
    cause = (f"no answer from another rank within --collective-timeout {timeout:g} s: a rank hung (a stuck file "
             f"system, a hung GPU, SIGSTOP) or its node was lost" if timed_out else
             "another rank's process died (killed, out of memory, a crash) or its node was lost")
    return CollectiveFailed(f"rank {accelerator.process_index}: {place} failed after step {step} "
                            f"({first_line(error)}): {cause}; with launcher restarts the job starts again from the "
                            f"newest checkpoint")


# ----------------------------------------------------------------------------- one rank for all

def _shareable(error: Exception, rank: int, doing: str) -> Exception:
    """What the other ranks raise for this rank's error: the same one for a user error, else RankFailed."""
    if isinstance(error, SHARED_ERRORS):
        with contextlib.suppress(Exception):
            pickle.dumps(error)
            return error
    detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
    return RankFailed(f"rank {rank} failed while {doing} ({type(error).__name__}: {detail}); see its traceback")


def on_main_process(accelerator: Accelerator, function, doing: str):
    """Rank 0 runs function(); every rank returns its value, or raises its error (`doing` names the work in
    the message of an unexpected one). The value must pickle (it is broadcast)."""
    value, error = None, None
    if accelerator.is_main_process:
        try:
            value = function()
        except Exception as err:
            error = err
    if accelerator.num_processes > 1:
        shared = [(value, _shareable(error, 0, doing) if error else None)]
        broadcast_object_list(shared, from_process=0)
        if error is None:
            value, error = shared[0]
    if error is not None:
        raise error
    return value


def raise_if_any_rank_failed(accelerator: Accelerator, error: Exception | None, doing: str) -> None:
    """Every rank calls it, with its own error or None: if any rank failed, every rank raises (its own
    error, else the first failing rank's)."""
    errors = gather_object([_shareable(error, accelerator.process_index, doing) if error else None])
    if error is not None:
        raise error
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]


# ----------------------------------------------------------------------------- the run directory, the data

def choose_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """--output-dir, else runs/<timestamp> as rank 0 names it (ranks may start a second apart). The trackers
    then write into <run_dir>/tensorboard."""
    run_dir = on_main_process(accelerator, lambda: cfg.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}",
                              "naming the run directory")
    accelerator.project_configuration.project_dir = accelerator.project_configuration.logging_dir = run_dir
    return Path(run_dir)


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


def check_output_dir(run_dir: Path, accelerator: Accelerator) -> RunDirLock | None:
    """Before any work: rank 0 creates the run directory, writes a file in it, checks that its checkpoints/ and
    tensorboard/ are directories if they exist, and takes the run directory's lock; every rank learns the
    outcome, so a bad or busy --output-dir fails in seconds with one line instead of at the first checkpoint.
    Returns the lock on rank 0 (it writes every file of the run; the directory is meant to be on a shared file
    system), None on the others."""
    lock = RunDirLock(run_dir) if accelerator.is_main_process else None

    def claim():
        problem = _write_problem(run_dir) or _entry_problem(run_dir)
        if problem:
            raise ConfigError(f"output directory {run_dir} is not writable ({problem}); choose another --output-dir")
        lock.acquire()

    on_main_process(accelerator, claim, "checking the output directory")
    return lock


def _entry_problem(run_dir: Path) -> str | None:
    """Why the run directory's own subdirectories cannot be used (one is a file, a dangling link, a link loop)."""
    for name in ("checkpoints", "tensorboard"):
        path = run_dir / name
        if os.path.lexists(path) and not os.path.isdir(path):
            kind = "a link to nowhere or to itself" if os.path.islink(path) else "a file"
            return f"{path} is {kind}, not a directory"
    return None


class RunDirLock:
    """One run directory, one writer: an exclusive lock (flock) on <run_dir>/.lock for the life of the run, held
    by rank 0. The kernel drops it when the holder's process ends in any way, kill -9 included. On a network
    file system it needs working flock: NFSv4 and NFSv3 with lockd (Linux emulates flock with POSIX locks
    there), Lustre mounted with -o flock (not localflock), GPFS. The file records the holder, for the message
    the next run gets."""

    SAME_JOB_WAIT = 120  # seconds a restarted or requeued run of the same job waits for the old one to be gone

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def acquire(self) -> None:
        import fcntl

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
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _job_id() -> str | None:
    """The Slurm job this process belongs to: its requeues share the id. (A launcher's restarts need no id: it
    starts the new processes once the old ones are gone.)"""
    return os.environ.get("SLURM_JOB_ID")


def load_data_on_every_rank(cfg: TrainConfig, accelerator: Accelerator, write: bool = True) -> tuple[Split, Split]:
    """load_data in two turns: first the local main process of each node (it writes the synthetic set or
    downloads Fashion-MNIST), then the other ranks, which read the finished files. After each turn every
    rank learns whether any rank failed. (local_main_process_first() would instead leave the other ranks
    waiting in its barrier when the first rank fails, say on missing files with --no-download.)"""
    splits = None
    for first_turn in (True, False):
        error = None
        if accelerator.is_local_main_process == first_turn:
            try:
                splits = load_data(cfg, write)
            except Exception as err:  # an unexpected one keeps its traceback here, and is shared too
                error = err
        raise_if_any_rank_failed(accelerator, error, "loading the data")
    return splits
