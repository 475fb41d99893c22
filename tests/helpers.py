"""The tests' shared tools: the tiny configuration, one runner for the real command line (in this process or
in fresh ones, with a hang timeout), the process finder, the TensorBoard event reader and the corrupt-file
makers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# ----------------------------------------------------------------------------- the tiny configuration

# The real architecture at 1/8 width on 64x64 inputs, on a small synthetic set (the `data_dir` fixture makes
# it once). Without the evaluation figures (matplotlib would take about a third of each tiny run);
# test_monitor.py turns them back on.
TRAIN_SAMPLES, TEST_SAMPLES, BATCH, LOG_EVERY, WIDTH = 1024, 101, 32, 4, 0.125
TINY_WITHOUT_BATCH = ["--dataset", "synthetic", "--synthetic-train-size", str(TRAIN_SAMPLES), "--synthetic-test-size",
                      str(TEST_SAMPLES), "--image-size", "64", "--model-width", str(WIDTH), "--log-every",
                      str(LOG_EVERY), "--no-log-figures"]
TINY = [*TINY_WITHOUT_BATCH, "--batch-size", str(BATCH)]


def steps_per_epoch(processes: int = 1) -> int:
    return TRAIN_SAMPLES // (processes * BATCH)


def tiny_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """TINY on `data_dir`, into `run_dir`; with --global-batch-size among `extra`, without TINY's --batch-size."""
    options = TINY_WITHOUT_BATCH if "--global-batch-size" in extra else TINY
    return [*options, "--data-dir", str(data_dir), "--output-dir", str(run_dir), *extra]


def tiny_split(data_dir: Path, train: bool = False):
    """The tiny synthetic set's test (or training) split, as the trainer reads it."""
    from dist_alexnet.datasets import SYNTHETIC_SEED, load_split, synthetic_root

    return load_split(synthetic_root(data_dir, TRAIN_SAMPLES, TEST_SAMPLES, SYNTHETIC_SEED), train=train,
                      download=False)


def tiny_raw_dir(data_dir: Path) -> Path:
    """The folder of the tiny synthetic set's four IDX files."""
    from dist_alexnet.datasets import SYNTHETIC_SEED, synthetic_root

    return synthetic_root(data_dir, TRAIN_SAMPLES, TEST_SAMPLES, SYNTHETIC_SEED) / "FashionMNIST" / "raw"


# ----------------------------------------------------------------------------- running the command line

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    """Environment for the runs: CPU only, quiet, one thread per process (2 cores shared)."""
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


def run(args: list[str], processes: int = 1, subcommand: str = "train", timeout: float = 300, check: bool = True,
        env: dict | None = None, cwd=None, in_process: bool | None = None,
        prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """Run `dist-alexnet SUBCOMMAND ARGS` and return its exit code and output.

    One process runs in this one (the command line's entry point, main(argv): the same code path without a
    process start), unless in_process=False or a `prefix` command is given; several run under
    `accelerate launch`. A real run still going after `timeout` seconds fails the test as a hang, and its
    whole process tree is killed."""
    env = env or cpu_env()
    if in_process is None:
        in_process = processes == 1 and not prefix
    if in_process:
        result = run_in_this_process([subcommand, *args], env, cwd or REPO)
    else:
        result = run_process([*prefix, *command(args, processes, subcommand)], env, cwd or REPO, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-4000:]}")
    return result


def run_process(cmd: list[str], env: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s: a hang\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_in_this_process(argv: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    """cli.main(argv) with `env` as the environment and `cwd` as the working directory; its output captured.
    An exception that would end a real process is printed as Python would and gives exit code 1. Accelerate's
    process-wide state is reset afterwards, so the next run starts as a fresh process would."""
    from dist_alexnet.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's errors and --help
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        reset_accelerate()
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state (as its own test cases do between tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_tiny(run_dir: Path, data_dir: Path, *extra: str, processes: int = 1, **kwargs):
    return run(tiny_args(data_dir, run_dir, *extra), processes=processes, **kwargs)


def start(args: list[str], processes: int = 1, env: dict | None = None) -> subprocess.Popen:
    """A real run in the background, its stdout and stderr merged into proc.stdout (for signals and kills)."""
    return subprocess.Popen(command(args, processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or cpu_env(), cwd=REPO)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read proc's output until a line containing `needle`; the lines read so far."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen:\n{''.join(lines)[-3000:]}")


def fake_scontrol(folder: Path, job_id: str) -> tuple[dict, Path]:
    """An environment inside "Slurm job `job_id`" whose `scontrol` only records its arguments, and the file it
    records them in."""
    fake_bin = folder / "bin"
    fake_bin.mkdir()
    record = folder / "scontrol-args"
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    (fake_bin / "scontrol").chmod(0o755)
    return cpu_env(PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID=job_id), record


# ----------------------------------------------------------------------------- processes

def child_processes(pid: int) -> list[int]:
    """The pids whose parent is `pid`, read from /proc."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes a launcher (`accelerate launch`, torchrun) started."""
    ranks = {}
    for pid in child_processes(launcher_pid):
        with contextlib.suppress(OSError):
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = pid
    return ranks


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; reaped either way."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it (the launchers start their workers in sessions of their own)."""
    for child in child_processes(pid):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- what a run left

def metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def events(run_dir: Path):
    """TensorBoard's own reader over the run's event files, everything loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar."""
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


# ----------------------------------------------------------------------------- corrupt files

def truncate(path: Path) -> Path:
    """Cut the file to half its length (a copy interrupted, a disk that filled up)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_truncate(raw: Path):
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    return f, "truncated"


def corrupt_magic(raw: Path):
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(b"\x1f\x8b" + f.read_bytes()[2:])
    return f, "magic"


def corrupt_count(raw: Path):
    from dist_alexnet.datasets import write_idx

    f = raw / "train-labels-idx1-ubyte"
    n = len(raw_labels(raw))
    write_idx(f, torch.zeros(n - 1, dtype=torch.uint8))
    return f, f"{n - 1} labels for {n} images"


def corrupt_label(raw: Path):
    from dist_alexnet.datasets import write_idx

    f = raw / "train-labels-idx1-ubyte"
    n = len(raw_labels(raw))
    write_idx(f, torch.tensor([3] * (n - 1) + [10], dtype=torch.uint8))
    return f, f"label 10 at index {n - 1} is outside 0..9"


def corrupt_shape(raw: Path):
    from dist_alexnet.datasets import write_idx

    f = raw / "train-images-idx3-ubyte"
    write_idx(f, torch.zeros(len(raw_labels(raw)), 32, 32, dtype=torch.uint8))
    return f, "images are (32, 32), Fashion-MNIST's are 28x28"


def raw_labels(raw: Path) -> torch.Tensor:
    from dist_alexnet.datasets import read_idx

    return read_idx(raw / "train-labels-idx1-ubyte", 1)
