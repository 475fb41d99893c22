"""Is dist-alexnet's input pipeline why its reference run learns less than a plain PyTorch loop? Trains the same
recipe (the reference run's Adam at 1e-3, 64 px, batch 64) on the shipped real Fashion-MNIST sample, for
several seeds, four ways, and prints the test accuracy of each:

  trainer      `dist-alexnet train` (device pipeline: matrix-product bilinear resize, normalized input)
  plain-pil    a plain 40-line loop: PIL Resize + ToTensor per image, no normalization (the tutorial's input)
  plain-ours   the same loop fed dist-alexnet's device transform (to_model_input: resize, then normalize)
  plain-ours01 the same loop fed dist-alexnet's resize without the normalization (inputs in [0, 1])

The three plain loops of one seed start from the same weights and see the same batches in the same order, so
their differences are the input's alone; plain-pil vs plain-ours01 is the resize (PIL's fixed-point bilinear
against the matrix product), plain-ours01 vs plain-ours the normalization, trainer vs plain-ours the rest of
the trainer (drop_last, its own data order and dropout streams).

    python scripts/input_pipeline_gap.py --seeds 0 1 2 --epochs 6 --json gap.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dist_alexnet.datasets import MEAN, STD, load_sample
from dist_alexnet.inputs import to_model_input
from dist_alexnet.model import AlexNet

VARIANTS = ("trainer", "plain-pil", "plain-ours", "plain-ours01")


class Images(Dataset):
    """(image, label) of a Split, the image as the variant's input pipeline makes it."""

    def __init__(self, split, image_size: int, variant: str):
        from torchvision import transforms

        self.split, self.image_size, self.variant = split, image_size, variant
        self.pil = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor()])

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        from PIL import Image

        if self.variant == "plain-pil":
            return self.pil(Image.fromarray(self.split.images[i].numpy(), mode="L")), self.split.labels[i]
        x = to_model_input(self.split.images[i:i + 1], self.image_size)[0]
        return (x * STD + MEAN if self.variant == "plain-ours01" else x), self.split.labels[i]


def plain_loop(variant: str, seed: int, epochs: int, image_size: int, batch_size: int) -> float:
    """The tutorial's training loop, on the sample's training part; the test part's accuracy at the end."""
    train, test = load_sample()
    torch.manual_seed(seed)
    model = AlexNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(Images(train, image_size, variant), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(Images(test, image_size, variant), batch_size=256):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(test)


def trainer(seed: int, epochs: int, image_size: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run([sys.executable, "-m", "dist_alexnet.cli", "train", "--dataset", "fashion-mnist-sample",
                        "--image-size", str(image_size), "--batch-size", str(batch_size), "--epochs", str(epochs),
                        "--seed", str(seed), "--no-log-figures", "--log-every", "1000", "--output-dir", run_dir],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(run_dir) / "metrics.json").read_text())["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", metavar="PATH", help="also write {variant: [test accuracy per seed]}")
    args = parser.parse_args()

    results = {variant: [] for variant in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            if variant == "trainer":
                acc = trainer(seed, args.epochs, args.image_size, args.batch_size)
            else:
                acc = plain_loop(variant, seed, args.epochs, args.image_size, args.batch_size)
            results[variant].append(acc)
            print(f"seed {seed} {variant:<13} test accuracy {acc:.4f}", flush=True)

    print(f"\n{args.epochs} epochs, {args.image_size} px, batch {args.batch_size}, Adam 1e-3, shipped sample "
          f"(3,000 train / 615 test), seeds {args.seeds}")
    print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | std |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for variant, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {variant} | " + " | ".join(f"{a:.4f}" for a in accs)
              + f" | {statistics.mean(accs):.4f} | {spread:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
