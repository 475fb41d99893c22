"""Measure what monitoring costs: the same training run with TensorBoard logging every step, at the default
--log-every, and effectively off (one point at the last step), side by side.

    python scripts/logging_overhead.py                     # 2 CPU processes, small model, 1 epoch
    python scripts/logging_overhead.py --processes 1 -- --image-size 224 --model-width 1  # any trainer options

Runs alternate between the settings and repeat, so a slow moment of a shared machine hits all of them.
Prints training images/s (metrics.json: training time only, evaluation excluded) and wall seconds
(the whole run, evaluation and its images, the report and process start included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {"every step": "1", "default (50)": "50", "off": str(10**9)}
CONFIG = ["--dataset", "synthetic", "--synthetic-train-size", "6000", "--synthetic-test-size", "1000",
          "--image-size", "64", "--model-width", "0.25", "--batch-size", "16", "--epochs", "1"]


def command(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "dist_alexnet.cli", "train", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "dist_alexnet.cli", "train", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="trainer options after --, added to (and overriding) the defaults")
    args = parser.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    results = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, log_every in SETTINGS.items():
                run_dir = Path(tmp) / f"run-{repeat}-{log_every}"
                cmd = command(args.processes, [*CONFIG, "--data-dir", f"{tmp}/data", "--output-dir", str(run_dir),
                                               "--log-every", log_every, *args.extra])
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                metrics = json.loads((run_dir / "metrics.json").read_text())
                results[name].append((metrics["train_images_per_sec"], metrics["wall_seconds"]))
                print(f"  {name:>13}: {metrics['train_images_per_sec']:8.1f} images/s, "
                      f"{metrics['wall_seconds']:6.1f} s wall", flush=True)
                shutil.rmtree(run_dir)

    print(f"\n{args.processes} process(es), {' '.join(CONFIG + args.extra)}; median of {args.repeats}")
    print("| logging | --log-every | training images/s | wall seconds |\n|---|---|---|---|")
    for name, log_every in SETTINGS.items():
        speed = statistics.median(r[0] for r in results[name])
        wall = statistics.median(r[1] for r in results[name])
        print(f"| {name} | {log_every} | {speed:.0f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
