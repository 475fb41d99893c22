"""The data sets on disk: Fashion-MNIST's IDX files, read and validated; the real sample that ships with the
package; and the built-in synthetic set.

The whole data set is 70,000 uint8 images of 28x28 (55 MB): load_data() returns it as two Splits held
in memory, one uint8 tensor of images and one of labels each. How batches are drawn from them and turned
into model input is dist_alexnet/inputs.py.

  --dataset fashion-mnist         the official files in <data-dir>/FashionMNIST/raw (torchvision's layout;
                                  torchvision downloads them when missing)
  --dataset fashion-mnist-sample  the first 3,615 images of the official training set, in the package
                                  (fashion_mnist_sample/, official IDX gzip files, MIT license): images
                                  0-2,999 are its training part, 3,000-3,614 its test part. Offline, real.
  --dataset synthetic             generated silhouettes of the ten classes, written as IDX files under
                                  <data-dir> (offline, any size: what most tests use)
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from dist_alexnet.distributed import raise_if_any_rank_failed
from dist_alexnet.errors import DataError

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Pixel statistics of the Fashion-MNIST training set, on the [0, 1] scale.
MEAN, STD = 0.2860, 0.3530

# File names inside <root>/FashionMNIST/raw/, as torchvision.datasets.FashionMNIST expects them.
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one Fashion-MNIST uses
# The synthetic data set does not change with --seed, so runs with different seeds compare on the same data.
SYNTHETIC_SEED = 1234
# The shipped sample, and where its training part ends.
SAMPLE_DIR = Path(__file__).parent / "fashion_mnist_sample"
SAMPLE_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
SAMPLE_TRAIN_SIZE = 3000
OFFLINE_HINT = "--dataset fashion-mnist-sample (a real sample shipped with dist-alexnet) or --dataset synthetic"


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def part(self, start: int, stop: int) -> Split:
        return Split(self.images[start:stop], self.labels[start:stop])


# ----------------------------------------------------------------------------- IDX files

def write_idx(path: str | os.PathLike, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file, atomically (temp file + rename)."""
    path = Path(path)
    assert array.dtype == torch.uint8
    header = bytes([0, 0, _UBYTE, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(header)
        f.write(array.contiguous().numpy().tobytes())
    os.replace(tmp, path)


def read_idx(path: str | os.PathLike, ndim: int) -> torch.Tensor:
    """Read and validate a uint8 IDX file with `ndim` dimensions, gzip-compressed when its name ends in .gz
    (as the official download names them); raise DataError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}); fix its permissions or replace "
                        f"it") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: not a complete gzip file ({err}); re-download it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number); re-download it or delete it to "
                        f"have it downloaded again")
    if data[2] != _UBYTE or data[3] != ndim:
        raise DataError(f"{path}: expected an IDX file of unsigned bytes with {ndim} dimension(s), found "
                        f"type code {data[2]:#04x} with {data[3]} dimension(s); is it the right file?")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated header ({len(data)} bytes); re-download the file")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if shape[0] == 0:
        raise DataError(f"{path}: holds no samples (its header says shape {shape}); re-download the file")
    expected = header_len + math.prod(shape)
    if len(data) != expected:
        raise DataError(f"{path}: {'truncated' if len(data) < expected else 'has trailing bytes'}: header "
                        f"says shape {shape} ({expected} bytes) but the file has {len(data)} bytes; "
                        f"re-download the file")
    return torch.frombuffer(bytearray(data[header_len:]), dtype=torch.uint8).reshape(shape)


def read_images_and_labels(images_file: Path, labels_file: Path) -> Split:
    """A pair of IDX files read and checked: 28x28 images, as many labels as images, labels in 0..9."""
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{images_file}: images are {tuple(images.shape[1:])}, Fashion-MNIST's are 28x28")
    if len(images) != len(labels):
        raise DataError(f"{labels_file}: {len(labels)} labels for {len(images)} images in {images_file.name}; "
                        f"the two files must come from the same download")
    if len(labels) and int(labels.max()) > 9:
        bad = int((labels > 9).nonzero()[0])
        raise DataError(f"{labels_file}: label {int(labels[bad])} at index {bad} is outside 0..9")
    return Split(images, labels.long())


# ----------------------------------------------------------------------------- data sets

def load_sample() -> tuple[Split, Split]:
    """The shipped real sample: its training part (images 0-2,999) and its test part (3,000-3,614)."""
    sample = read_images_and_labels(*(SAMPLE_DIR / name for name in SAMPLE_FILES))
    return sample.part(0, SAMPLE_TRAIN_SIZE), sample.part(SAMPLE_TRAIN_SIZE, len(sample))


def synthetic_root(data_dir: str | os.PathLike, train_size: int, test_size: int, seed: int) -> Path:
    """The synthetic set gets its own folder, so it never overwrites real Fashion-MNIST files."""
    return Path(data_dir) / f"synthetic-{train_size}-{test_size}-seed{seed}"


def load_split(root: Path, train: bool, download: bool) -> Split:
    """One split of the torchvision layout under `root`, read and validated (torchvision downloads the files
    when they are missing and `download` is set)."""
    raw_dir = root / "FashionMNIST" / "raw"
    missing = [name for pair in IDX_FILES.values() for name in pair if idx_file(raw_dir, name) is None]
    if missing:
        if not download:
            raise DataError(f"Fashion-MNIST not found: {raw_dir} lacks {', '.join(missing)}. Put the four "
                            f"*-ubyte files (or the official *-ubyte.gz) there, drop --no-download to fetch them, "
                            f"or use {OFFLINE_HINT} "
                            f"to train offline")
        try:
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError on network trouble
            raise DataError(f"could not download Fashion-MNIST into {raw_dir} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'no detail'}). Copy the four *-ubyte "
                            f"files there by hand, or use {OFFLINE_HINT} to train offline") from None
    return read_images_and_labels(*(idx_file(raw_dir, name) for name in IDX_FILES[train]))


def idx_file(raw_dir: Path, name: str) -> Path | None:
    """`name` in raw_dir, extracted or as the official download's `name.gz`; None when neither is there."""
    return next((path for path in (raw_dir / name, raw_dir / f"{name}.gz") if path.exists()), None)


def make_synthetic(root: Path, train_size: int, test_size: int, seed: int) -> None:
    """Write the built-in synthetic data set as the four IDX files of the torchvision layout."""
    raw_dir = root / "FashionMNIST" / "raw"
    generator = torch.Generator().manual_seed(seed)
    for train, n in ((True, train_size), (False, test_size)):
        images_file, labels_file = (raw_dir / name for name in IDX_FILES[train])
        if images_file.exists() and labels_file.exists():
            continue
        images, labels = synthetic_samples(n, generator)
        write_idx(labels_file, labels.to(torch.uint8))
        write_idx(images_file, images)


def _prototypes() -> torch.Tensor:
    """Ten 28x28 silhouettes in [0, 1], one per Fashion-MNIST class, drawn from rectangles."""
    protos = torch.zeros(10, 28, 28)

    def box(k, rows, cols, value=1.0):
        protos[k, rows[0]:rows[1], cols[0]:cols[1]] = value

    box(0, (6, 25), (9, 19)); box(0, (6, 11), (4, 24))                            # T-shirt: short sleeves
    box(1, (3, 26), (8, 13)); box(1, (3, 26), (15, 20)); box(1, (3, 7), (8, 20))   # trouser: two legs
    box(2, (5, 24), (8, 20)); box(2, (5, 22), (4, 8)); box(2, (5, 22), (20, 24))   # pullover: long sleeves
    for r in range(3, 26):                                                          # dress: widening
        half = 3 + (r - 3) // 3
        box(3, (r, r + 1), (14 - half, 14 + half))
    box(4, (4, 26), (7, 21)); box(4, (4, 24), (3, 7)); box(4, (4, 24), (21, 25))   # coat: long + zip
    box(4, (8, 26), (13, 15), 0.3)
    for r in (15, 18, 21):                                                          # sandal: straps
        box(5, (r, r + 2), (3, 25))
    box(5, (14, 23), (3, 5))
    box(6, (5, 24), (8, 20)); box(6, (5, 20), (4, 8)); box(6, (5, 20), (20, 24))   # shirt: collar, buttons
    box(6, (5, 8), (12, 16), 0.2); box(6, (9, 24), (13, 15), 0.6)
    box(7, (16, 22), (2, 26)); box(7, (12, 16), (14, 26))                          # sneaker: low
    box(8, (9, 25), (5, 23)); box(8, (4, 9), (9, 11)); box(8, (4, 9), (17, 19))    # bag: handles
    box(8, (4, 6), (9, 19))
    box(9, (4, 20), (14, 23)); box(9, (16, 24), (3, 24))                           # ankle boot
    return protos


def synthetic_samples(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the ten silhouettes under random affine jitter, contrast, texture, a faint blend of
    another class and pixel noise: learnable (a short run climbs far above chance) but not trivially
    (upper-body garments look alike, as in the real data set)."""
    protos = _prototypes()
    labels = torch.randint(0, 10, (n,), generator=generator)
    others = torch.randint(0, 10, (n,), generator=generator)
    blend = torch.rand(n, 1, 1, generator=generator) * 0.5
    base = (1 - blend) * protos[labels] + blend * protos[others]

    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(30)
    scale = 0.8 + 0.35 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.35
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, 28, 28), align_corners=False)
    warped = F.grid_sample(base.unsqueeze(1), grid, align_corners=False).squeeze(1)

    contrast = 0.45 + 0.55 * torch.rand(n, 1, 1, generator=generator)
    texture = 0.7 + 0.3 * torch.rand(n, 28, 28, generator=generator)
    noise = 0.18 * torch.randn(n, 28, 28, generator=generator)
    images = (warped * contrast * texture + noise).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


def load_data(cfg, write: bool = True) -> tuple[Split, Split]:
    """The train and test splits named by the config. The synthetic set is written on first use, unless `write`
    is off (evaluate writes nothing): then it is generated in memory when its files are missing."""
    if cfg.dataset == "fashion-mnist-sample":
        train, test = load_sample()
        return train.head(cfg.limit_train), test.head(cfg.limit_test)
    if cfg.dataset == "synthetic":
        root = synthetic_root(cfg.data_dir, cfg.synthetic_train_size, cfg.synthetic_test_size, SYNTHETIC_SEED)
        if not write and not all((root / "FashionMNIST" / "raw" / name).exists() for pair in IDX_FILES.values()
                                 for name in pair):
            generator = torch.Generator().manual_seed(SYNTHETIC_SEED)  # as make_synthetic draws them
            train, test = (Split(*synthetic_samples(n, generator))
                           for n in (cfg.synthetic_train_size, cfg.synthetic_test_size))
            return train.head(cfg.limit_train), test.head(cfg.limit_test)
        try:
            make_synthetic(root, cfg.synthetic_train_size, cfg.synthetic_test_size, SYNTHETIC_SEED)
        except OSError as err:
            raise DataError(f"could not write the synthetic data set into {root} ({err.strerror or err}); "
                            f"choose a writable --data-dir") from None
        download = False
    else:
        root, download = Path(cfg.data_dir), cfg.download
    train = load_split(root, train=True, download=download).head(cfg.limit_train)
    test = load_split(root, train=False, download=download).head(cfg.limit_test)
    return train, test


def data_fingerprint(split: Split) -> str:
    """A split's size and content in a few words, the same on every rank that read the same files."""
    return (f"{len(split)} samples, pixel sum {int(split.images.sum(dtype=torch.int64))}, label sum "
            f"{int(split.labels.sum())}")


def load_data_on_every_rank(cfg, accelerator, write: bool = True) -> tuple[Split, Split]:
    """load_data in two turns: first the local main process of each node (it writes the synthetic set or
    downloads Fashion-MNIST), then the other ranks, which read the finished files. After each turn every
    rank learns whether any rank failed. (local_main_process_first() would instead leave the other ranks
    waiting in its barrier when the first rank fails, say on missing files with --no-download.)"""
    splits = None
    for first_turn in (True, False):
        error = None
        if accelerator.is_local_main_process == first_turn:
            try:
                splits = load_data(cfg, write)
            except Exception as err:  # an unexpected one keeps its traceback here, and is shared too
                error = err
        raise_if_any_rank_failed(accelerator, error, "loading the data")
    return splits
