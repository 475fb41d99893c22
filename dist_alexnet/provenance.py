"""How a run was started: the command that reproduces it and the launcher that ran it, for the run's records.

Under `accelerate launch` or torchrun the command to rerun is the launcher's, not the training process's
own: it is read from the parent process (/proc on Linux).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def _parent_argv() -> list[str] | None:
    try:  # Linux; elsewhere the run's own command line is used
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _launcher(argv: list[str]) -> str | None:
    head = [Path(a).name for a in argv[:3]]
    if "accelerate" in head or "accelerate.commands.launch" in argv[:3]:
        return "accelerate launch"
    if "torchrun" in head or "torch.distributed.run" in argv[:3]:
        return "torchrun"
    return None


def _tidy(argv: list[str]) -> list[str]:
    """[/venv/bin/python, /venv/bin/accelerate, launch, ...] -> [accelerate, launch, ...]: as typed with the
    project's virtualenv active."""
    argv = list(argv)
    if len(argv) > 1 and Path(argv[0]).name.startswith("python") and Path(argv[1]).name in (
            "accelerate", "torchrun", "dist-alexnet"):
        argv = argv[1:]
    if Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    elif Path(argv[0]).name in ("accelerate", "torchrun", "dist-alexnet"):
        argv[0] = Path(argv[0]).name
    return argv


def launch_command() -> tuple[str, str]:
    """(shell command that reproduces the run, from the directory it ran in; a line naming the launcher).
    Under `accelerate launch` or torchrun the launcher's own command line is the one to rerun, read
    from the parent process; otherwise this process's command line as it was given (sys.orig_argv)."""
    parent = _parent_argv()
    launcher = _launcher(parent) if parent else None
    argv = _tidy(parent if launcher else sys.orig_argv)
    command = f"cd {shlex.quote(os.getcwd())}\n{shlex.join(argv)}"
    world = os.environ.get("WORLD_SIZE", "1")
    note = f"launched by {launcher} ({world} process(es))" if launcher else f"launched directly ({world} process(es))"
    if os.environ.get("SLURM_JOB_ID"):
        note += (f" inside Slurm job {os.environ['SLURM_JOB_ID']} ({os.environ.get('SLURM_JOB_NAME', '')}); "
                 f"on the cluster, resubmit the same batch script to reproduce it")
    return command, note + "; the command assumes the project's virtualenv is active"
