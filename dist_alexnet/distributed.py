"""Running on many processes: the Accelerator, failed collectives, and the few things one rank does for all.

Rank 0 writes every file of a run and chooses its name (rundir.py); the first process of each node loads
(or writes) the data before the others read it (datasets.py). Whatever one rank does for the others, every rank must
learn how it went: if only the failing rank stopped, the others would wait in their next collective
for the process-group timeout (30 minutes). on_main_process() and raise_if_any_rank_failed() are the
two ways of doing that, and the only ones used.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DDPCommunicationHookType, DistributedDataParallelKwargs,
                              InitProcessGroupKwargs, broadcast_object_list, gather_object)

from dist_alexnet.config import TrainConfig, resolve_mixed_precision
from dist_alexnet.device import use_cuda
from dist_alexnet.errors import (CheckpointError, CollectiveFailed, ConfigError, DataError, Interrupted, RankFailed,
                                 first_line)

# Errors that say what is wrong with the user's input or files: a rank that learns of one on another rank
# raises the same error, so that every rank prints the same one line.
SHARED_ERRORS = (ConfigError, DataError, CheckpointError, Interrupted)


# What an accelerate config's distributed_type asks for, as accelerate launch tells its workers.
UNSUPPORTED_LAUNCH_MODES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def check_launch_mode(cfg: TrainConfig) -> None:
    """An accelerate config with distributed_type FSDP runs with --parallelism fsdp, which shards with torch's
    FSDP2 itself (Accelerate's own FSDP wrapper is turned off for this process); DeepSpeed and Megatron-LM
    configs are refused. Each in one line."""
    for variable, name in UNSUPPORTED_LAUNCH_MODES.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise ConfigError(f"the accelerate config asks for {name}, which dist-alexnet does not run; for sharded "
                              f"parameters and optimizer state use launch/accelerate/fsdp.yaml with --parallelism "
                              f"fsdp, else a MULTI_GPU config (launch/accelerate/one_node.yaml)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        if cfg.parallelism != "fsdp":
            raise ConfigError(f"the accelerate config asks for FSDP (distributed_type: FSDP); pass --parallelism fsdp "
                              f"(this run says --parallelism {cfg.parallelism}), or launch with a MULTI_GPU config")
        os.environ["ACCELERATE_USE_FSDP"] = "false"


def launcher_variables(env=os.environ) -> dict[str, int]:
    """The launcher's variables this process runs under (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_PORT), checked before anything reads them: whole numbers, a rank below its world size, a port in
    range. An unset variable is left out; a set but empty one is an error (an unset variable in a job script)."""
    values, problems = {}, []
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        if name not in env:
            continue
        text = env[name].strip()
        if not text.isdigit():
            problems.append(f"{name}={env[name]!r} is not a whole number")
            continue
        values[name] = int(text)
    world, local_world = values.get("WORLD_SIZE", 1), values.get("LOCAL_WORLD_SIZE", values.get("WORLD_SIZE", 1))
    if world < 1:
        problems.append(f"WORLD_SIZE={world} must be at least 1")
    if values.get("RANK", 0) >= world:
        problems.append(f"RANK={values['RANK']} must be below WORLD_SIZE={world}")
    if values.get("LOCAL_RANK", 0) >= max(local_world, 1):
        problems.append(f"LOCAL_RANK={values['LOCAL_RANK']} must be below LOCAL_WORLD_SIZE={local_world}")
    if not 0 < values.get("MASTER_PORT", 1) < 65536:
        problems.append(f"MASTER_PORT={values['MASTER_PORT']} is not a port (1-65535)")
    if problems:
        raise ConfigError(f"the launcher's environment is not usable: {'; '.join(problems)}; start the processes with "
                          f"accelerate launch or torchrun, or unset WORLD_SIZE, RANK, LOCAL_RANK and MASTER_PORT for "
                          f"one process")
    return values


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator for cfg (precision, accumulation, DDP options, collective timeout), after checking that
    all the processes the launcher started joined one job."""
    check_launch_mode(cfg)
    launched = launcher_variables().get("WORLD_SIZE", 1)
    # NCCL's watchdog: on a timed-out collective abort the communicators but leave the process alive (2, CleanUpOnly,
    # instead of torch's default 3, which kills the process from the watchdog thread without a word), so that the
    # waiting rank raises and is_collective_failure / collective_failed turn it into one line naming its phase;
    # and dump the flight recorder's ring of recent collectives (README: Crashes and hangs). A user's setting wins.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    try:
        accelerator = Accelerator(
            # Without CUDA, run on the CPU (gloo): Accelerate would otherwise leave the processes of
            # `accelerate launch --multi_gpu` or torchrun as independent single-process runs.
            cpu=not use_cuda(),
            project_dir="runs",  # placeholder until RunDir.choose() sets the run directory
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

@contextlib.contextmanager
def phase(what: str):
    """The trainer says what this rank is doing (`with phase("the evaluation"):`). An error that leaves the block
    carries the innermost phase it left (error.phase), which the one line of a failed collective names: what
    the rank was doing, not which function happened to be on the stack."""
    try:
        yield
    except BaseException as error:
        if not hasattr(error, "phase"):
            with contextlib.suppress(AttributeError):  # (a few built-in exceptions take no attributes)
                error.phase = what
        raise


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
    place = getattr(error, "phase", "a collective")
    timed_out = "imed out" in str(error)
    cause = (f"no answer from another rank within --collective-timeout {timeout:g} s: a rank hung (a stuck file "
             f"system, a hung GPU, SIGSTOP) or its node was lost" if timed_out else
             "another rank's process died (killed, out of memory, a crash) or its node was lost")
    return CollectiveFailed(f"rank {accelerator.process_index}: {place} failed after step {step} "
                            f"({first_line(error)}): {cause}; with launcher restarts the job starts again from the "
                            f"newest checkpoint")


def check_ranks_agree(accelerator: Accelerator, fingerprint: dict, what: str, fix: str) -> None:
    """Every rank calls it before any work with what must be the same on all of them (`fingerprint`: name ->
    value); a difference stops every rank with one line naming the first differing entry and the ranks."""
    if accelerator.num_processes == 1:
        return
    with phase(f"comparing the ranks' {what}"):
        prints = gather_object([fingerprint])
    for name, value in prints[0].items():
        others = [rank for rank, theirs in enumerate(prints) if theirs.get(name) != value]
        if others:
            seen = ", ".join(f"rank {rank}: {prints[rank].get(name)!r}" for rank in others[:3])
            raise ConfigError(f"the ranks disagree on their {what}: {name} is {value!r} on rank 0 but {seen}; {fix}")


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
        with phase(f"waiting for rank 0 ({doing})"):
            broadcast_object_list(shared, from_process=0)
        if error is None:
            value, error = shared[0]
    if error is not None:
        raise error
    return value


def raise_if_any_rank_failed(accelerator: Accelerator, error: Exception | None, doing: str) -> None:
    """Every rank calls it, with its own error or None: if any rank failed, every rank raises (its own
    error, else the first failing rank's)."""
    with phase(doing):
        errors = gather_object([_shareable(error, accelerator.process_index, doing) if error else None])
    if error is not None:
        raise error
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
