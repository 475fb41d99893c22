"""Checkpoints: complete or invisible.

Layout: <run>/checkpoints/step_NNNNNN/ holding model.safetensors (state dict of the unwrapped model)
and trainer_state.json. A checkpoint is written under a temporary name, fsynced, then renamed, so a
directory named step_* is always complete; old ones are deleted only after the new one is committed.
Only rank 0 calls these functions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

CHECKPOINT_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or not ours. The message names the file."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    trainer_state: dict, keep: int) -> Path:
    """Write step_NNNNNN atomically, then drop all but the newest `keep` checkpoints."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:06d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model_state.items()}
    save_file(tensors, tmp / "model.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a resumed run's first save): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
