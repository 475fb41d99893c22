"""The tests' shared tools: the tiny configuration (command-line options, and a TrainConfig for the tests that
build one in this process), one runner for the real command line (in this process or in fresh ones, under any
launcher, with a hang timeout), one reader of a process's or a file's lines that waits for a pattern, the
process finder, what a run left (metrics, TensorBoard scalars, weights, losses), the shared assertions and the
corrupt-file makers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import queue
import re
import signal
import socket
import subprocess
import tempfile
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# ----------------------------------------------------------------------------- the tiny configuration

# The real architecture at 1/8 width on 64x64 inputs, on a small synthetic set (the `data_dir` fixture makes
# it once). Without the evaluation figures (matplotlib would take about a third of each tiny run);
# test_monitor.py turns them back on.
TRAIN_SAMPLES, TEST_SAMPLES, BATCH, LOG_EVERY, WIDTH, IMAGE_SIZE = 1024, 101, 32, 4, 0.125, 64
TINY_WITHOUT_BATCH = ["--dataset", "synthetic", "--synthetic-train-size", str(TRAIN_SAMPLES), "--synthetic-test-size",
                      str(TEST_SAMPLES), "--image-size", str(IMAGE_SIZE), "--model-width", str(WIDTH), "--log-every",
                      str(LOG_EVERY), "--no-log-figures"]
TINY = [*TINY_WITHOUT_BATCH, "--batch-size", str(BATCH)]

# A warmup + cosine schedule and a weight average: their state must survive an interruption too (the exact-resume
# tests of test_resume.py and test_parallel.py).
RECIPE = ["--epochs", "2", "--log-every", "1", "--lr-schedule", "cosine", "--warmup-steps", "5", "--min-lr", "1e-5",
          "--ema-decay", "0.9"]


def steps_per_epoch(processes: int = 1) -> int:
    return TRAIN_SAMPLES // (processes * BATCH)


def tiny_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """TINY on `data_dir`, into `run_dir`; with --global-batch-size among `extra`, without TINY's --batch-size."""
    options = TINY_WITHOUT_BATCH if "--global-batch-size" in extra else TINY
    return [*options, "--data-dir", str(data_dir), "--output-dir", str(run_dir), *extra]


def tiny_config(**overrides):
    """TINY's options as a dist_alexnet.config.TrainConfig, with keyword overrides of any field (not validated:
    call .validate() where the test needs it)."""
    from dist_alexnet.config import TrainConfig

    values = dict(dataset="synthetic", synthetic_train_size=TRAIN_SAMPLES, synthetic_test_size=TEST_SAMPLES,
                  image_size=IMAGE_SIZE, model_width=WIDTH, batch_size=BATCH, log_every=LOG_EVERY, log_figures=False)
    return TrainConfig(**{**values, **overrides})


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


def torchrun(*options: str, processes: int = 2) -> list[str]:
    """The `torchrun` launcher with N processes on this machine (its own options after)."""
    return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), *options]


def accelerate_with(config: str, *options: str) -> list[str]:
    """`accelerate launch` with one of the repository's config files (launch/accelerate/...), options after."""
    return [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / config), *options]


def command(args: list[str], processes: int = 1, subcommand: str = "train", launcher: list[str] | None = None,
            blocked_imports: tuple[str, ...] = ()) -> list[str]:
    """`dist-alexnet SUBCOMMAND ARGS`: under `launcher` (e.g. torchrun(...)) when given, else under
    `accelerate launch` with N CPU processes when N > 1; `blocked_imports`: in a Python in which importing those
    modules fails (an extra that is not installed)."""
    if blocked_imports:
        hide = "; ".join(f"sys.modules[{name!r}] = None" for name in blocked_imports)
        code = f"import sys; {hide}; from dist_alexnet.cli import main; sys.exit(main(sys.argv[1:]))"
        return [sys.executable, "-c", code, subcommand, *args]
    if launcher is not None:
        return [*launcher, "-m", "dist_alexnet.cli", subcommand, *args]
    if processes == 1:
        return [sys.executable, "-m", "dist_alexnet.cli", subcommand, *args]
    return [*accelerate_launch(processes), "-m", "dist_alexnet.cli", subcommand, *args]


def accelerate_launch(processes: int) -> list[str]:
    """`accelerate launch` with N CPU processes on this machine."""
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def run(args: list[str], processes: int = 1, subcommand: str = "train", timeout: float = 300, check: bool = True,
        env: dict | None = None, cwd=None, in_process: bool | None = None, prefix: list[str] = (),
        launcher: list[str] | None = None, blocked_imports: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `dist-alexnet SUBCOMMAND ARGS` and return its exit code and output.

    One process runs in this one (the command line's entry point, main(argv): the same code path without a
    process start), unless in_process=False, a `prefix` command (e.g. setpriv ...), a `launcher` or
    `blocked_imports` is given (see command()). Several processes expected to succeed (`check`) start as the
    launcher would start them (run_ranks); expected to fail, under `accelerate launch`, whose handling of a
    failing rank is what a user sees. A real run still going after `timeout` seconds fails the test as a hang,
    and its whole process tree is killed."""
    env = env or cpu_env()
    if in_process is None:
        in_process = processes == 1 and not prefix and launcher is None and not blocked_imports
    if in_process:
        result = run_in_this_process([subcommand, *args], env, cwd or REPO)
    elif processes > 1 and check and launcher is None and not prefix and not blocked_imports:
        result = run_ranks(command(args, 1, subcommand), processes, env, cwd or REPO, timeout)
    else:
        result = run_process([*prefix, *command(args, processes, subcommand, launcher, blocked_imports)], env,
                             cwd or REPO, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-4000:]}")
    return result


def run_process(cmd: list[str], env: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
    """Any command in a fresh process, its output captured; a hang (past `timeout`) kills its tree and fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s: a hang\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ranks(cmd: list[str] | list[list[str]], processes: int, env: dict, cwd, timeout: float
              ) -> subprocess.CompletedProcess:
    """`processes` ranks of `cmd` on this machine, started with the variables a launcher gives its workers
    (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the processes `accelerate launch
    --multi_gpu` starts, without the 2-3 s its own start-up takes (the suite starts about a hundred). Their
    output merged into one stdout and one stderr as a launcher's is; when a rank fails, the others are stopped
    after a few seconds, as torchrun stops them; the exit code is the first failing rank's. `cmd`: one command for
    all, or one per rank (ranks started with different options)."""
    commands = cmd if isinstance(cmd[0], list) else [cmd] * processes
    port = str(free_port())
    per_node = int(env.get("LOCAL_WORLD_SIZE", processes))  # (a test may pretend to run on several nodes)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        procs = [subprocess.Popen(commands[rank], stdout=out, stderr=err, text=True, cwd=cwd,
                                  env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank % per_node),
                                           WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(per_node),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for rank in range(processes)]
        deadline, failed_at = time.monotonic() + timeout, None
        while any(proc.poll() is None for proc in procs):
            now = time.monotonic()
            if failed_at is None and any(proc.returncode for proc in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + 5):
                for proc in procs:
                    kill_tree(proc.pid)
                    proc.wait()
                if now > deadline:
                    out.seek(0), err.seek(0)
                    raise AssertionError(f"still running after {timeout} s: a hang\n{out.read()[-3000:]}\n"
                                         f"{err.read()[-3000:]}")
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        code = next((proc.returncode for proc in procs if proc.returncode), 0)
        return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


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


def start(args: list[str], processes: int = 1, env: dict | None = None, launcher: list[str] | None = None,
          subcommand: str = "train") -> subprocess.Popen:
    """A real run in the background, its stdout and stderr merged into proc.stdout (for signals and kills; read
    it with Lines(proc))."""
    return subprocess.Popen(command(args, processes, subcommand, launcher), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or cpu_env(), cwd=REPO)


class Seen(NamedTuple):
    index: int  # of the line in Lines.lines
    time: float  # time.monotonic() when the line was first read
    match: re.Match


class Lines:
    """The lines of a running process's output (read in a thread as they come, proc.stdout of start()) or of a
    file that something else writes (read again at each look), each with the time it was first read; wait_for
    waits for a line matching a pattern."""

    FILE_POLL = 0.05  # seconds between looks at a file

    def __init__(self, source: subprocess.Popen | Path):
        self.lines: list[tuple[float, str]] = []
        self.proc = source if isinstance(source, subprocess.Popen) else None
        self.path = None if self.proc else Path(source)
        self._fresh: queue.Queue = queue.Queue()
        self._reader = None
        if self.proc:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
            self._fresh.put(None)
        self._fresh.put(None)  # the end of the output

    def _look_at_file(self) -> None:
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        whole = text.splitlines(keepends=True)
        if whole and not whole[-1].endswith("\n"):
            whole.pop()  # a line still being written
        now = time.monotonic()
        self.lines.extend((now, line) for line in whole[len(self.lines):])

    def _ended(self) -> bool:
        return self.proc is not None and not self._reader.is_alive()

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 180) -> Seen:
        """The first line from index `after` on that matches the regular expression `pattern` (re.search). Fails
        when `timeout` seconds pass, or the process's output ends, without one."""
        deadline, index = time.monotonic() + timeout, after
        while True:
            if self.path:
                self._look_at_file()
            ended = self._ended()  # before reading the lines: none can come after it
            while index < len(self.lines):
                match = re.search(pattern, self.lines[index][1])
                if match:
                    return Seen(index, self.lines[index][0], match)
                index += 1
            left = deadline - time.monotonic()
            if ended or left <= 0:
                break
            if self.path:
                time.sleep(min(self.FILE_POLL, left))
            else:
                with contextlib.suppress(queue.Empty):
                    self._fresh.get(timeout=min(1.0, left))
        why = "the output ended" if ended else f"{timeout} s passed"
        where = f" in {self.path}" if self.path else ""
        raise AssertionError(f"no line matching {pattern!r}{where} ({why}):\n{self.text()[-4000:]}")

    def finish(self, timeout: float = 120) -> int:
        """The process's exit code, once it has exited and all its output is read (a hang fails the test)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self.text()[-4000:]}") from None
        self._reader.join(timeout=30)
        return code

    def text(self) -> str:
        if self.path:
            self._look_at_file()
        return "".join(line for _, line in self.lines)


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


def event_record(run_dir: Path):
    """TensorBoard's own reader over the run's event files, every event as written. For the run's data as the
    report reads it, use dist_alexnet.report.read_events(run_dir / "tensorboard"); that one keeps a step's
    later event only, so a step written twice shows only here (what the every-step-once checks need), and only
    here are the summaries' metadata (the hparams plugin's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar, every event as written (see event_record)."""
    return [(e.step, e.value) for e in event_record(run_dir).Scalars(tag)]


def per_step_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) as TensorBoard recorded them."""
    return scalars(run_dir, "train/loss")


def final_weights(run_dir: Path, which: str = "model") -> dict:
    """The newest checkpoint's weights (`which`: model, or ema for the weight average)."""
    from safetensors.torch import load_file

    from dist_alexnet.checkpoint import list_checkpoints

    return load_file(list_checkpoints(run_dir)[-1] / f"{which}.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def single_process_correct(checkpoint: Path, data_dir: Path) -> range:
    """The numbers of tiny test samples that another layout's evaluation of the checkpoint may get right, from a
    plain single-process one: exactly its count, except that a sample whose two highest logits are within float
    rounding of each other (SUM_ORDER_RTOL of the largest logit: the same sums in another order) may go either
    way. Use as `count in single_process_correct(...)`; with no such near-tie the range holds one number."""
    from safetensors.torch import load_file

    from dist_alexnet.inputs import to_model_input
    from dist_alexnet.model import AlexNet

    model = AlexNet(width=WIDTH).eval()
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    test = tiny_split(data_dir)
    with torch.no_grad():
        logits = model(to_model_input(test.images, IMAGE_SIZE))
    top2 = logits.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= SUM_ORDER_RTOL * logits.abs().max()
    surely_correct = int(((logits.argmax(1) == test.labels) & ~near_tie).sum())
    return range(surely_correct, surely_correct + int(near_tie.sum()) + 1)


# ----------------------------------------------------------------------------- shared assertions

ERROR = "dist-alexnet: error: "


def errors(result) -> list[str]:
    """Our one-line messages (every rank prints its own)."""
    return [line[len(ERROR):] for line in result.stderr.splitlines() if line.startswith(ERROR)]


def assert_clean_failure(result, processes: int, code: int = 2, launcher: bool | None = None) -> str:
    """One identical line per rank and no traceback but the launcher's; the exit code of a single process (or of
    ranks started without a launcher: run_ranks), or any non-zero one from the launcher (torch elastic reports a
    failed worker as exit 1, with a traceback and a ChildFailedError summary of its own). Returns the message."""
    launcher = processes > 1 if launcher is None else launcher
    output = result.stdout + result.stderr
    assert not re.search(r'File ".*dist_alexnet/', output), output[-4000:]
    assert output.count("Traceback") == launcher and "Exception in thread" not in output, output[-4000:]
    lines = errors(result)
    assert len(lines) == processes and len(set(lines)) == 1, output[-4000:]
    assert result.returncode == code if not launcher else result.returncode != 0, output[-4000:]
    return lines[0]


# One optimizer step taken from the same state by two layouts (1-process ddp, 2-process ddp, hybrid) or two
# implementations (fused, foreach). They compute the same sums in another order, so their results differ by float32
# rounding; compared over many steps, Adam turns that rounding into different trajectories, sooner or later
# depending on the CPU's kernels. So runs are compared one step at a time, from the same state, with bounds
# derived from the arithmetic:
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: the spacing of float32 at 1.0 (twice its unit roundoff)
# A sum of N float32 terms in another order differs by about sqrt(N) * EPS32 of the sum of their magnitudes
# (rounding errors add up like a random walk). The longest sums of the tiny model: a convolution's weight gradient
# over 32 images x 15 x 15 positions (N = 7,200: sqrt(N) = 85); a value passes through at most 8 such layers,
# forward and backward, so the loss and each gradient agree to 8 x 85 x EPS32 = 8.1e-5 of their scale: 1e-4.
SUM_ORDER_RTOL = 1e-4
# Adam's update of one weight is a handful of float32 operations (a square root, two divisions, an addition, a
# multiply-add), each rounded to within EPS32 / 2 of its value: the new weight is within EPS32 / 2 of |w'| plus
# 4 x EPS32 / 2 of |update| of the exact update of its own moments. Twice that, for margin: EPS32 x (|w'| + 4 |u|).
ADAM_STEP_OPERATIONS = 4


def checkpoint_at(run_dir: Path, step: int) -> Path:
    from dist_alexnet.checkpoint import checkpoint_dir

    return checkpoint_dir(run_dir, step)


def one_step_from(checkpoint: Path, run_dir: Path, data_dir: Path, *extra: str, processes: int = 1):
    """Resume `checkpoint` into a new run directory for exactly one optimizer step: the checkpoint it ends with,
    and the run's output."""
    from dist_alexnet.checkpoint import checkpoint_step

    step = checkpoint_step(checkpoint) + 1
    result = train_tiny(run_dir, data_dir, *extra, "--resume", str(checkpoint), "--max-steps", str(step),
                        processes=processes)
    return checkpoint_at(run_dir, step), result.stdout


def adam_state(checkpoint: Path) -> dict:
    """name -> (weight, exp_avg, exp_avg_sq, step) in float64, with the step's settings (lr, betas, eps,
    weight_decay) under the key None."""
    from safetensors.torch import load_file

    from dist_alexnet.model import AlexNet

    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    names = [name for name, _ in AlexNet(width=trainer_state["config"]["model_width"]).named_parameters()]
    weights = load_file(checkpoint / "model.safetensors")
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    (group,) = saved["param_groups"]
    assert group["params"] == list(range(len(names))), "one group over model.parameters(), in their order"
    state = {names[i]: (weights[names[i]].double(), s["exp_avg"].double(), s["exp_avg_sq"].double(), int(s["step"]))
             for i, s in saved["state"].items()}
    return {**state, None: {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}}


def assert_same_step(a: Path, b: Path, before: Path | None = None) -> None:
    """Checkpoints `a` and `b` were each made one Adam step after the same state: checkpoint `before`, or with
    None the seed's initial weights and no optimizer state (a run's first step). They took the same step:
    - the same loss, to SUM_ORDER_RTOL (the same weights and samples, summed in another order);
    - the same gradient, to SUM_ORDER_RTOL of the tensor's largest (recovered from Adam's first moment:
      exp_avg = beta1 * exp_avg_before + (1 - beta1) * gradient);
    - each weight moved from the same weight by Adam's update of its own moments (within the rounding of those
      few operations), and that weight is `before`'s.
    The new weights themselves are not compared with each other: Adam's first steps move a weight by about lr
    whatever the size of its gradient, so one whose gradient is at rounding level (near 0) may go either way."""
    from dist_alexnet.checkpoint import checkpoint_step

    step = checkpoint_step(a)
    assert checkpoint_step(b) == step == (checkpoint_step(before) + 1 if before else 1), (a, b, before)
    losses = [dict(per_step_losses(checkpoint.parent.parent))[step] for checkpoint in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=SUM_ORDER_RTOL), losses
    states = [adam_state(a), adam_state(b)]
    settings = states[0].pop(None)
    assert states[1].pop(None) == settings
    assert settings["weight_decay"] == 0, "decoupled or L2 weight decay would change the reconstruction below"
    lr, (beta1, beta2), eps = settings["lr"], settings["betas"], settings["eps"]
    old = adam_state(before) if before else None
    for name in states[0]:
        weight_in, m_in = (old[name][0], old[name][1]) if old else (None, 0.0)
        gradients, second_moments, weights_in = [], [], []
        for state in states:
            weight, m, v, t = state[name]
            assert t == step, (name, t, step)
            gradients.append((m - beta1 * m_in) / (1 - beta1))
            second_moments.append(v)
            # torch's Adam: w' = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
            update = lr / (1 - beta1 ** t) * m / (v.sqrt() / math.sqrt(1 - beta2 ** t) + eps)
            weights_in.append((weight + update, EPS32 * (weight.abs() + ADAM_STEP_OPERATIONS * update.abs())))
        # the gradients: to SUM_ORDER_RTOL of the largest, plus the rounding of each exp_avg (EPS32 / 2 of it)
        # divided by (1 - beta1) as the recovery divides it
        scale = max(g.abs().max().item() for g in gradients)
        largest_m = max(state[name][1].abs().max().item() for state in states)
        difference = (gradients[0] - gradients[1]).abs().max().item()
        assert difference <= SUM_ORDER_RTOL * scale + EPS32 * largest_m / (1 - beta1), (name, "gradient", difference)
        # Adam's second moments, beta2 * v_before + (1 - beta2) * g^2: (1 - beta2) |g_a^2 - g_b^2| apart, which is
        # at most (1 - beta2) x 2 x scale x the gradients' bound, plus each one's rounding
        v_a, v_b = second_moments
        bound = 2 * (1 - beta2) * scale * SUM_ORDER_RTOL * scale + EPS32 * torch.maximum(v_a, v_b)
        assert ((v_a - v_b).abs() <= bound).all(), (name, "exp_avg_sq", (v_a - v_b).abs().max())
        (w_a, rounding_a), (w_b, rounding_b) = weights_in
        assert ((w_a - w_b).abs() <= rounding_a + rounding_b).all(), (name, "weight in", (w_a - w_b).abs().max())
        if weight_in is not None:
            assert ((w_a - weight_in).abs() <= rounding_a).all(), (name, "weight in", (w_a - weight_in).abs().max())


def samples_per_step(log_dir: Path) -> dict[tuple[int, int], list[int]]:
    """(epoch, step) -> the sorted indices of the training samples that made that step, over every rank, from
    the DIST_ALEXNET_SAMPLE_LOG files in `log_dir`."""
    seen: dict[tuple[int, int], list[int]] = {}
    for file in Path(log_dir).glob("*.txt"):
        for line in file.read_text().splitlines():
            epoch, step, index = map(int, line.split())
            seen.setdefault((epoch, step), []).append(index)
    return {key: sorted(indices) for key, indices in sorted(seen.items())}


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
