"""Checkpoint files that survive anything: atomic saves, retention, the best one, safe loading.

A checkpoint is complete or invisible: rank 0 writes it under a temporary name, fsyncs every file,
then renames it to checkpoints/step_NNNNNN/. Old ones are deleted only after the new one is
committed (renamed away first, so a half-deleted one is never mistaken for a checkpoint), and the
best one by test accuracy is kept as well (checkpoints/best links to it).

    step_000123/           its files: CHECKPOINT_FILES (what holds what, how it is read and checked)
      trainer_state.json   the TrainState and what the run was (TRAINER_STATE_FIELDS)

Loading never executes code from a file: safetensors for the weights, torch.load(weights_only=True)
for the rest.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as save_safetensors

from dist_alexnet.errors import CheckpointError, first_line
from dist_alexnet.rundir import RunDir

CHECKPOINT_NAME = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
# trainer_state.json: each key's type (None allowed where the tuple says so); the optional keys are missing from
# checkpoints of 0.1 (TrainState.load_state_dict fills them in).
TRAINER_STATE_FIELDS = {"step": (int,), "epoch": (int,), "position": (int,),
                        "best_test_acc": (float, int, type(None)), "test_acc": (float, int, type(None)),
                        "pending_train_sums": (list,), "world_size": (int,), "signature": (dict,), "config": (dict,)}
OPTIONAL_TRAINER_STATE_FIELDS = {"applied_steps": (int,), "last_train_loss": (float, int, type(None))}


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    folder = RunDir(run_dir).checkpoints
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a run's checkpoint of `step` is (or would be) committed: checkpoints/step_NNNNNN."""
    return RunDir(run_dir).checkpoints / f"step_{step:06d}"


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint directory (step_NNNNNN) is named for."""
    return int(CHECKPOINT_NAME.match(checkpoint.name).group(1))


def half_written(run_dir: str | os.PathLike) -> list[Path]:
    """Leftovers of a save or a deletion that was interrupted (by kill -9, a node failure...)."""
    folder = RunDir(run_dir).checkpoints
    return sorted(folder.glob(".tmp-*")) + sorted(folder.glob(".trash-*")) if folder.is_dir() else []


# ----------------------------------------------------------------------------- saving

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Rename out of sight first (atomic), then delete: an interrupted delete leaves only a .trash-* dir."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_file(path: Path, content) -> None:
    """One file of a checkpoint: a state dict with safetensors for *.safetensors, torch.save otherwise.
    Both libraries report a failed write (a full disk) as their own error without the reason; here it
    comes out as the OSError that says what went wrong."""
    if path.suffix == ".safetensors":
        path.write_bytes(save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in content.items()}))
        return
    try:
        with open(path, "wb") as f:
            torch.save(content, f)
    except RuntimeError as err:  # "unexpected pos ...": torch's zip writer, after the file's write() failed
        if isinstance(err.__context__, OSError):
            raise err.__context__ from None
        raise


def save_checkpoint(run_dir: str | os.PathLike, step: int, contents: dict[str, object], trainer_state: dict,
                    keep: int, protect: Path | None = None) -> Path:
    """Write step_NNNNNN atomically (rank 0 only), then apply retention, which never deletes this checkpoint
    nor `protect` (the one the run resumed from). `contents` maps the keys of CHECKPOINT_FILES to what goes in
    their files (the required ones, and the optional ones the run has)."""
    final = checkpoint_dir(run_dir, step)
    folder = final.parent
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in half_written(run_dir):  # from an earlier, interrupted process
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
        for file in CHECKPOINT_FILES:
            if file.key in contents:
                _write_file(tmp / file.name, contents[file.key])
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if final.exists():  # the same step saved again (a resumed run re-reaching it): replace it
            _remove(final)
        os.rename(tmp, final)
        _fsync(folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = f"the previous one, {previous[-1]}, is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final} ({err.strerror or err}); {kept}; free space "
                              f"or choose another --output-dir") from None
    if trainer_state.get("test_acc") is not None and trainer_state["test_acc"] >= trainer_state["best_test_acc"]:
        _point_best_at(final)
    _apply_retention(run_dir, keep, protected={final, protect})
    return final


def _point_best_at(checkpoint: Path) -> None:
    link = checkpoint.parent / "best"
    tmp = checkpoint.parent / f".best-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(checkpoint.name)  # relative: the run directory can be moved
    if link.is_dir() and not link.is_symlink():  # a copy of the run made `best` a real directory
        shutil.rmtree(link)
    os.replace(tmp, link)


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    link = RunDir(run_dir).checkpoints / "best"
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def _apply_retention(run_dir: str | os.PathLike, keep: int, protected: set) -> None:
    keep_too = {p.resolve() for p in protected | {best_checkpoint(run_dir)} if p is not None}
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.resolve() not in keep_too:
            _remove(old)


# ----------------------------------------------------------------------------- loading

def read_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {checkpoint} is not a dist-alexnet checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not valid JSON)") from None


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err})") from None


def load_tensors(path: Path, map_location="cpu"):
    """torch.load that only accepts tensors and plain containers: a pickle cannot run code here."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError/EOFError for truncation
        raise CheckpointError(f"{path} is corrupt or holds more than plain tensors; refusing to load it "
                              f"({first_line(err, 200)})") from None


class IncompatibleCheckpoint(CheckpointError):
    """A sound checkpoint, made for another model or data set: no reason to fall back to an older one."""


@dataclass
class Expected:
    """What a checkpoint must hold to be loaded into this run: its signature (model width, data set), the shape
    of each weight, and of each parameter of each of the optimizer's groups."""
    signature: dict
    model_shapes: dict[str, tuple]
    optimizer_groups: list[list[tuple]]

    @classmethod
    def of(cls, signature: dict, model) -> Expected:
        """What `model`'s checkpoint holds: its tensors' full shapes (a DTensor's shape is the whole tensor's) and
        one optimizer group over its parameters in order (the layout save writes whatever the parallelism)."""
        return cls(signature, {name: tuple(t.shape) for name, t in model.state_dict().items()},
                   [[tuple(p.shape) for p in model.parameters()]])


def load_checkpoint(checkpoint: Path, expected: Expected | None = None) -> dict:
    """Everything a resume needs, read and validated (against `expected` when given): {"path", "trainer_state",
    and each CHECKPOINT_FILES key whose file is there}; raises CheckpointError naming the bad file."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist (expected a checkpoints/step_NNNNNN "
                              f"directory)")
    state = read_trainer_state(checkpoint)
    _check_trainer_state(state, checkpoint)
    if expected is not None:
        check_compatible(state, expected.signature, checkpoint)
    loaded = {"path": checkpoint, "trainer_state": state}
    for file in CHECKPOINT_FILES:
        if file.required or (checkpoint / file.name).exists():
            loaded[file.key] = file.read(checkpoint / file.name)
    for file in CHECKPOINT_FILES:
        if file.key in loaded:
            file.check(loaded[file.key], checkpoint / file.name, expected)
    return loaded


def _check_trainer_state(state, checkpoint: Path) -> None:
    path = checkpoint / TRAINER_STATE
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not the trainer's state")
    for key, kinds in {**TRAINER_STATE_FIELDS, **OPTIONAL_TRAINER_STATE_FIELDS}.items():
        if key not in state:
            if key in OPTIONAL_TRAINER_STATE_FIELDS:
                continue
            raise CheckpointError(f"{path} lacks {key!r}: it is damaged or not a dist-alexnet checkpoint")
        if not isinstance(state[key], kinds) or isinstance(state[key], bool):
            kind = {int: "whole number", float: "number", list: "list", dict: "mapping"}[kinds[0]]
            raise CheckpointError(f"{path}: {key} is {state[key]!r}, not a {kind}")
    named = CHECKPOINT_NAME.match(checkpoint.name)  # first: the most telling of the checks
    if named and int(named.group(1)) != state["step"]:
        raise CheckpointError(f"{path} says step {state['step']} but the checkpoint is {checkpoint.name}: it was "
                              f"renamed or mixed up with another")
    for problem in _trainer_state_problems(state):
        raise CheckpointError(f"{path}: {problem}: it is damaged or was edited; resume from another checkpoint "
                              f"(--resume PATH) or start afresh in another --output-dir")


def _trainer_state_problems(state: dict):
    """What is out of range in a trainer_state.json whose keys have the right types: each field against the others
    and against the run it describes (its signature: the training samples; its config: the batch)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    step, position = state["step"], state["position"]
    samples = state["signature"].get("train_samples")
    if step < 0 or state["epoch"] < 0 or position < 0:
        yield f"step {step}, epoch {state['epoch']}, position {position}: none may be negative"
    applied = state.get("applied_steps", step)  # checkpoints of 0.1 have none: every step was applied
    if not (isinstance(applied, int) and not isinstance(applied, bool) and 0 <= applied <= step):
        yield f"applied_steps is {applied!r}, not a whole number from 0 to the step, {step}"
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
        yield f"signature.train_samples is {samples!r}, not a positive whole number"
    elif position > samples:  # == samples: preempted at the epoch's last step, before its evaluation
        yield f"position {position} is past the end of an epoch of {samples} training samples"
    if state["world_size"] < 1:
        yield f"world_size is {state['world_size']}, not a positive number of processes"
    for key in ("test_acc", "best_test_acc"):
        if state[key] is not None and not (number(state[key]) and 0 <= state[key] <= 1):
            yield f"{key} is {state[key]!r}, not an accuracy from 0 to 1"
    sums = state["pending_train_sums"]
    if len(sums) != 3 or not all(number(v) and v >= 0 for v in sums):
        yield f"pending_train_sums is {sums!r}, not three finite numbers >= 0 (loss x samples, correct, samples)"
    loss = state.get("last_train_loss")
    if loss is not None and not number(loss):
        yield f"last_train_loss is {loss!r}, not a number"


def _check_rng_states(states, path: Path) -> None:
    if not (isinstance(states, list) and states and all(
            isinstance(s, dict) and isinstance(s.get("cpu"), torch.Tensor) and s["cpu"].dtype == torch.uint8
            for s in states)):
        raise CheckpointError(f"{path} does not hold one RNG state per rank")


def check_weights(weights: dict, shapes: dict, path: Path, model: str = "this run's model") -> None:
    """Raise CheckpointError unless `weights` has exactly the names and shapes of `shapes` (the model's)."""
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != shapes:
        name = sorted(set(shapes.items()) ^ set(found.items()))[0][0]
        raise CheckpointError(f"{path} holds weights of another architecture, not {model} (first difference: {name} "
                              f"is {found.get(name, 'missing')} there, {shapes.get(name, 'not part of the model')} "
                              f"in the model)")


def _check_optimizer(saved, groups: list[list[tuple]], path: Path) -> None:
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise CheckpointError(f"{path} is not an optimizer's state")
    sizes = [len(group.get("params", ())) for group in saved["param_groups"] if isinstance(group, dict)]
    if sizes != [len(g) for g in groups]:
        raise CheckpointError(f"{path} is for parameter groups of sizes {sizes}, this optimizer has "
                              f"{[len(g) for g in groups]}")
    shapes = [shape for group in groups for shape in group]
    for index, values in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(shapes) or not isinstance(values, dict):
            raise CheckpointError(f"{path} holds state for a parameter this optimizer does not have ({index!r})")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shapes[index]:
                raise CheckpointError(f"{path}: {name} of parameter {index} is {tuple(value.shape)}, the parameter "
                                      f"is {shapes[index]}")


def _check_model(weights, path: Path, expected: Expected | None) -> None:
    if expected is not None:
        check_weights(weights, expected.model_shapes, path)


def _check_optimizer_against(saved, path: Path, expected: Expected | None) -> None:
    if expected is not None:
        _check_optimizer(saved, expected.optimizer_groups, path)


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint: the key its content has in save_checkpoint's `contents` and load_checkpoint's
    result, whether every checkpoint has it, how it is read (never running code from the file) and checked."""
    name: str
    key: str
    required: bool
    read: Callable[[Path], object]
    check: Callable[[object, Path, Expected | None], None]
    holds: str


CHECKPOINT_FILES = (
    CheckpointFile("model.safetensors", "model", True, load_model_state, _check_model,
                   "the unwrapped model's state dict (under --parallelism hybrid: the shards gathered)"),
    CheckpointFile("optimizer.pt", "optimizer", True, load_tensors, _check_optimizer_against,
                   "the optimizer's state (Adam's moments, SGD's momentum), in the same full layout"),
    CheckpointFile("rng_states.pt", "rng_states", True, load_tensors, lambda states, path, _: _check_rng_states(states, path),
                   "every rank's torch RNG states (gathered to rank 0)"),
    CheckpointFile("scaler.pt", "scaler", False, load_tensors, lambda *_: None,
                   "the GradScaler's state (fp16 only)"),
    CheckpointFile("ema.safetensors", "ema", False, load_model_state, _check_model,
                   "the moving average of the weights (--ema-decay only)"),
)


def checkpoint_file(checkpoint: Path, key: str) -> Path:
    """The path of a checkpoint's file by its CHECKPOINT_FILES key ("model", "ema", ...)."""
    return Path(checkpoint) / next(file.name for file in CHECKPOINT_FILES if file.key == key)


def find_resume_checkpoint(run_dir: str | os.PathLike, resume: str, log, expected: Expected | None = None
                           ) -> dict | None:
    """--resume none: nothing. PATH: that checkpoint (an error if it is bad), or, for a run directory, its newest
    valid checkpoint. auto: the newest complete and valid checkpoint of this run, falling back to older ones (with
    a warning) when it is corrupt. A run directory that holds checkpoints of which none can be resumed is
    refused, each named with its reason: starting afresh among them would mix two runs (and retention would
    delete the new one's checkpoints)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not RunDir(path).checkpoints.is_dir():
            return load_checkpoint(path, expected)
        run_dir, log_prefix = path, f"--resume {path}: "
        if not list_checkpoints(path):
            raise CheckpointError(f"--resume {path}: the run directory holds no complete checkpoint")
    else:
        log_prefix = ""
    for leftover in half_written(run_dir):
        log(f"warning: ignoring half-written checkpoint {leftover} (an earlier run was interrupted while saving)")
    problems = []
    for candidate in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(candidate, expected)
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as err:
            problems.append(f"{candidate.name}: {err}")
            log(f"warning: {log_prefix}skipping checkpoint {candidate}: {err}; falling back to the previous one")
    if problems:
        raise CheckpointError(f"{log_prefix}none of the {len(problems)} checkpoint(s) in {RunDir(run_dir).checkpoints} "
                              f"can be resumed ({'; '.join(problems)}); nothing was changed. Resume from a copy "
                              f"you trust with --resume PATH, or start afresh here with --resume none "
                              f"--move-old-checkpoints (the old run is moved aside, not deleted)")
    return None


def check_compatible(trainer_state: dict, signature: dict, path: Path) -> None:
    """Refuse a checkpoint made for another model shape or data set."""
    saved = trainer_state.get("signature", {})
    different = [f"{key} {saved.get(key)!r} (this run: {value!r})" for key, value in signature.items()
                 if saved.get(key) != value]
    if different:
        raise IncompatibleCheckpoint(f"checkpoint {path} was made for a different model or data set: "
                              f"{', '.join(different)}; continue that run with its own model and data options, or "
                              f"train this one in another --output-dir (or here with --resume none "
                              f"--move-old-checkpoints, which moves the old run aside)")
