"""Running on many processes: the Accelerator, and the few things one rank does for all of them.

Rank 0 writes every file of a run and chooses its name; the first process of each node loads (or
writes) the data before the others read it. Whatever one rank does for the others, every rank must
learn how it went: if only the failing rank stopped, the others would wait in their next collective
for the process-group timeout (30 minutes). on_main_process() and raise_if_any_rank_failed() are the
two ways of doing that, and the only ones used.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DDPCommunicationHookType, DistributedDataParallelKwargs,
                              broadcast_object_list, gather_object)

from dist_alexnet.checkpoint import CheckpointError
from dist_alexnet.config import ConfigError, TrainConfig, resolve_mixed_precision
from dist_alexnet.datasets import DataError, Split, load_data

# Errors that say what is wrong with the user's input or files: a rank that learns of one on another rank
# raises the same error, so that every rank prints the same one line.
SHARED_ERRORS = (ConfigError, DataError, CheckpointError)


class RankFailed(RuntimeError):
    """Another rank failed unexpectedly (it printed the traceback); this rank stops too instead of waiting."""


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator for cfg (precision, accumulation, DDP options), after checking that all the processes
    the launcher started joined one job."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Without CUDA, run on the CPU (gloo): Accelerate would otherwise leave the processes of
        # `accelerate launch --multi_gpu` or torchrun as independent single-process runs.
        cpu=not torch.cuda.is_available(),
        project_dir="runs",  # placeholder until choose_run_dir() sets the run directory
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


def check_output_dir(run_dir: Path, accelerator: Accelerator) -> None:
    """Before any work: rank 0 creates the run directory and writes a file in it, so a bad --output-dir fails
    on every rank in seconds with one line instead of at the first checkpoint. (Rank 0 writes every file of
    the run; the directory is meant to be on a shared file system.)"""
    def probe():
        problem = _write_problem(run_dir)
        if problem:
            raise ConfigError(f"output directory {run_dir} is not writable ({problem}); choose another --output-dir")

    on_main_process(accelerator, probe, "checking the output directory")


def load_data_on_every_rank(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Split, Split]:
    """load_data in two turns: first the local main process of each node (it writes the synthetic set or
    downloads Fashion-MNIST), then the other ranks, which read the finished files. After each turn every
    rank learns whether any rank failed. (local_main_process_first() would instead leave the other ranks
    waiting in its barrier when the first rank fails, say on missing files with --no-download.)"""
    splits = None
    for first_turn in (True, False):
        error = None
        if accelerator.is_local_main_process == first_turn:
            try:
                splits = load_data(cfg)
            except Exception as err:  # an unexpected one keeps its traceback here, and is shared too
                error = err
        raise_if_any_rank_failed(accelerator, error, "loading the data")
    return splits
