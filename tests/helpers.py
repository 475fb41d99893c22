"""Shared by the tests: run the real command line in fresh processes, on tiny synthetic data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A small, fast configuration: the real architecture at 1/8 width on 64x64 inputs. Without the evaluation
# figures (matplotlib would take about a third of each tiny run); test_monitor.py turns them back on.
TINY = ["--dataset", "synthetic", "--synthetic-train-size", "1024", "--synthetic-test-size", "101",
        "--image-size", "64", "--model-width", "0.125", "--batch-size", "32", "--log-every", "4", "--no-log-figures"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    """Environment for child processes: CPU only, quiet, one thread per process (2 cores shared)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def command(args: list[str], processes: int = 1, subcommand: str = "train") -> list[str]:
    """`dist-alexnet SUBCOMMAND ARGS`, under `accelerate launch` with N CPU processes when N > 1."""
    if processes == 1:
        return [sys.executable, "-m", "dist_alexnet.cli", subcommand, *args]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "dist_alexnet.cli", subcommand, *args]


def run(args: list[str], processes: int = 1, subcommand: str = "train", timeout: float = 300,
        check: bool = True, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run(command(args, processes, subcommand), capture_output=True, text=True,
                            timeout=timeout, env=env or cpu_env(), cwd=cwd or REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-4000:]}")
    return result


def train_tiny(run_dir: Path, data_dir: Path, *extra: str, processes: int = 1, **kwargs):
    return run([*TINY, "--data-dir", str(data_dir), "--output-dir", str(run_dir), *extra],
               processes=processes, **kwargs)


def metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
