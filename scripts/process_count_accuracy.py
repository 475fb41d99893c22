"""The accurate preset on 1 and on 2 processes with one --global-batch-size: the same test accuracy, within 2 points.

Trains launch/configs/accurate.yaml on the shipped real Fashion-MNIST sample (3,000 train / 615 test images) for
3 epochs at 64 px, model width 0.5, global batch 64, once in one process and once as a 2-process DDP job on the CPU
(`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`), and compares their test accuracies. With
--global-batch-size the two runs take the same optimizer steps over the same samples in the same order (each
process gets half of every batch); what differs is the dropout masks (each process draws its own half of the
batch's from its own stream) and the order of the floating-point sums. Different dropout masks move a 3-epoch run
on 615 test images by a few points, as another seed does, so one seed's gap is mostly that noise: the test is on
the mean over --seeds, which must agree to within --tolerance. `--dropout 0` takes the masks out (then only the
order of the sums differs) to show what is left.

--layouts compares any two layouts the same way: 2-process ddp against 2-process hybrid (the classifier split
between the processes, which draw their dropout masks their own way) on the sample is

    python scripts/process_count_accuracy.py --layouts 2:ddp 2:hybrid --epochs 5 --model-width 0.25 --seeds 0 1 \
        --tolerance 0.01

    python scripts/process_count_accuracy.py                   # seeds 0 1 2; exit 1 when the means differ by more
    python scripts/process_count_accuracy.py --seeds 0 --dropout 0 --json process_count.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port for the job's rendezvous (the default 29500 may be taken by another job on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout(text: str) -> tuple[int, str]:
    """PROCESSES:PARALLELISM, e.g. 2:hybrid."""
    processes, _, parallelism = text.partition(":")
    if not processes.isdigit() or int(processes) < 1 or parallelism not in ("ddp", "hybrid"):
        raise argparse.ArgumentTypeError(f"{text!r} is not PROCESSES:PARALLELISM (e.g. 1:ddp, 2:hybrid)")
    return int(processes), parallelism


def layout_name(processes: int, parallelism: str) -> str:
    return f"{processes} process{'es' if processes > 1 else ''}" + ("" if parallelism == "ddp" else f" {parallelism}")


def train(processes: int, parallelism: str, run_dir: Path, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    """(test accuracy, seconds) of one run."""
    options = ["train", "--config", str(REPO / "launch" / "configs" / "accurate.yaml"), "--dataset",
               "fashion-mnist-sample", "--image-size", "64", "--model-width", str(args.model_width), "--epochs",
               str(args.epochs), "--global-batch-size", str(args.global_batch_size), "--seed", str(seed),
               "--no-log-figures", "--log-every", "1000", "--parallelism", parallelism, "--output-dir", str(run_dir)]
    if args.dropout is not None:
        options += ["--dropout", str(args.dropout)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    if processes == 1:
        command = [sys.executable, "-m", "dist_alexnet.cli", *options]
    else:  # one torch thread per process: the two share the machine's cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), "-m", "dist_alexnet.cli", *options]
    print("$ " + ("ACCELERATE_USE_CPU=1 " if processes > 1 else "") + " ".join(
        [Path(command[0]).name, *command[1:]]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    return json.loads((run_dir / "metrics.json").read_text())["test_acc"], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dropout", type=float, default=None, help="instead of the preset's 0.5")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model-width", type=float, default=0.5)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest accepted gap (default: %(default)g)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--layouts", type=layout, nargs=2, default=[(1, "ddp"), (2, "ddp")], metavar="N:MODE",
                        help="the two layouts compared, PROCESSES:PARALLELISM (default: 1:ddp 2:ddp)")
    args = parser.parse_args()
    (first, second), names = args.layouts, [layout_name(*each) for each in args.layouts]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            a, a_s = train(*first, Path(tmp) / f"first-{seed}", args, seed)
            b, b_s = train(*second, Path(tmp) / f"second-{seed}", args, seed)
            rows.append({"seed": seed, "first": a, "second": b, "gap": b - a, "first_seconds": round(a_s, 1),
                         "second_seconds": round(b_s, 1)})

    dropout = "" if args.dropout is None else f", dropout {args.dropout:g}"
    print(f"\naccurate.yaml, shipped sample, {args.epochs} epochs, 64 px, width {args.model_width:g}, global batch "
          f"{args.global_batch_size}{dropout}: test accuracy (615 images)")
    print(f"| seed | {names[0]} | {names[1]} | gap | time |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seed']} | {row['first']:.4f} | {row['second']:.4f} | {row['gap']:+.4f} | "
              f"{row['first_seconds']:.0f} s / {row['second_seconds']:.0f} s |")
    a = sum(row["first"] for row in rows) / len(rows)
    b = sum(row["second"] for row in rows) / len(rows)
    ok = abs(b - a) <= args.tolerance
    print(f"| mean | {a:.4f} | {b:.4f} | {b - a:+.4f} | |")
    print(f"the means differ by {abs(b - a):.4f}: {'within' if ok else 'OUTSIDE'} the tolerance of "
          f"{args.tolerance:g} (largest gap of one seed {max(abs(row['gap']) for row in rows):.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"layouts": names, "rows": rows, "first_mean": a, "second_mean": b,
                                               "tolerance": args.tolerance, "within": ok, "dropout": args.dropout,
                                               "epochs": args.epochs, "model_width": args.model_width,
                                               "global_batch_size": args.global_batch_size}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
