"""The reference recipe against a preset, side by side on real images: test accuracy after each epoch.

Trains the reference run (dist-alexnet's defaults: Adam at a constant 1e-3) and the preset (a YAML file of
train options) through `dist-alexnet train` as a user would, overriding only the epochs, the image size, the
data and the batch size (the same for both; a preset with --lr-scaling scales its learning rate to it), and
prints one table. By default the data is the real Fashion-MNIST sample that ships with dist-alexnet (3,000
training and 615 test images); --data-dir takes any Fashion-MNIST files in the torchvision layout instead (the
full set on a GPU machine, or another real subset).

    python scripts/compare_recipes.py                                   # 6 epochs at 64 px, batch 64, seed 0
    python scripts/compare_recipes.py --seeds 0 1 2                     # the mean of three seeds, and each
    python scripts/compare_recipes.py --data-dir data --epochs 10 --image-size 224 --batch-size 128 --json c.json
    python scripts/compare_recipes.py --preset launch/configs/long.yaml --data-dir data --epochs 20 --image-size 224 \
        --batch-size 512                                                # the long preset, on a GPU machine

A preset that sets global_batch_size (long.yaml) gets --batch-size as its global batch, and so does the reference
(on one process the two are the same); train refuses both options at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = REPO / "launch" / "configs" / "accurate.yaml"


def test_accuracy_per_epoch(run_dir: Path) -> list[float]:
    """test/acc after each epoch, from the run's TensorBoard events."""
    from dist_alexnet.report import read_events

    return [acc for _, acc in read_events(run_dir / "tensorboard").scalars["test/acc"]]


def batch_flag(preset: str) -> str:
    """--global-batch-size for a preset that sets global_batch_size, else --batch-size (train takes one of the two)."""
    import yaml

    values = yaml.safe_load(Path(preset).read_text()) or {}
    return "--global-batch-size" if "global_batch_size" in values else "--batch-size"


def train(options: list[str], run_dir: Path, args: argparse.Namespace, seed: int) -> list[float]:
    data = (["--dataset", "fashion-mnist", "--no-download", "--data-dir", args.data_dir] if args.data_dir
            else ["--dataset", "fashion-mnist-sample"])
    command = [sys.executable, "-m", "dist_alexnet.cli", "train", *options, *data, "--epochs", str(args.epochs),
               "--image-size", str(args.image_size), batch_flag(args.preset), str(args.batch_size), "--seed", str(seed),
               "--no-log-figures", "--log-every", "1000", "--output-dir", str(run_dir)]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return test_accuracy_per_epoch(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=str(DEFAULT_PRESET), help="the preset's YAML file (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="per process, for both recipes (one process: the global batch; default: 64)")
    parser.add_argument("--data-dir", help="Fashion-MNIST files in the torchvision layout (default: the shipped "
                                           "sample)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train both recipes with each; the table gives the mean (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    args = parser.parse_args()

    runs = {"reference": [], "preset": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs["reference"].append(train([], Path(tmp) / f"reference-{seed}", args, seed))
            runs["preset"].append(train(["--config", args.preset], Path(tmp) / f"preset-{seed}", args, seed))
    reference, preset = ([statistics.mean(values) for values in zip(*runs[name])] for name in ("reference", "preset"))

    data = args.data_dir or "the shipped Fashion-MNIST sample (3,000 train / 615 test)"
    seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"mean of seeds {', '.join(map(str, args.seeds))}"
    print(f"\ntest accuracy after each epoch: {data}, {args.image_size} px, batch {args.batch_size}, {seeds}")
    print(f"| epoch | reference (Adam 1e-3) | {Path(args.preset).name} | difference |\n|---|---|---|---|")
    for epoch, (ref, pre) in enumerate(zip(reference, preset), start=1):
        print(f"| {epoch} | {ref:.4f} | {pre:.4f} | {pre - ref:+.4f} |")
    if len(args.seeds) > 1:
        for seed, ref, pre in zip(args.seeds, runs["reference"], runs["preset"]):
            print(f"seed {seed}: after the last epoch, reference {ref[-1]:.4f}, preset {pre[-1]:.4f} "
                  f"({pre[-1] - ref[-1]:+.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": reference, "preset": preset, "preset_file": args.preset,
                                               "epochs": args.epochs, "image_size": args.image_size,
                                               "batch_size": args.batch_size, "data": data, "seeds": args.seeds,
                                               "per_seed": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
