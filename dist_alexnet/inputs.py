"""From the in-memory data set to model input: the loaders, the device-side transforms, augmentation.

The default ("device") pipeline hands out uint8 batches by indexing the split's tensor once per batch
and does the resize to the model's input size and the normalization as batched ops on the accelerator.
The tutorial's pipeline (PIL Resize + ToTensor per image in DataLoader workers) is kept as
"torchvision" for comparison: it spends most of its time on the CPU resizing images.

Augmentation (random crop with zero padding, horizontal flip) runs as batch ops on the device too. Each
sample's choice (a shift of -PAD..PAD pixels in each direction, flipped or not) is a pure function of
(seed, epoch, sample index), computed by integer hashing on the batch's device. Nothing is drawn from a
random generator, so there is no generator state to save or to keep in step across processes: a sample
is augmented the same way whichever process and batch it lands in (results do not depend on the world
size), and a run resumed mid-epoch applies exactly the augmentations the uninterrupted run would have.
It runs on the 28x28 uint8 images, before the resize: 64 times fewer pixels than at 224.

Random erasing (--random-erasing P, torchvision's RandomErasing) is hashed the same way, from a stream of its
own. It runs after the resize and the normalization, on the model's input, as torchvision's is used (after
Normalize): the rectangle's area is a fraction of the image the model sees and its value is 0 there, the
training set's mean pixel.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision import transforms

from dist_alexnet.datasets import MEAN, STD, Split
from dist_alexnet.device import use_cuda
from dist_alexnet.schedule import BatchPlan

PAD = 2  # pixels of zero padding on each side of a 28x28 image before the random 28x28 crop
_MASK = 0xFFFFFFFF


# ----------------------------------------------------------------------------- loaders


class EpochOrder(Sampler[int]):
    """The global sample order of one epoch: a permutation that depends only on (seed, epoch), read
    from position `start`. Accelerate deals consecutive batches of it to the processes, so the samples
    a run sees next are fixed by (seed, epoch, position) whatever the number of processes, which is
    what makes an exact resume possible.

    It yields whole optimizer steps only (multiples of `step_samples`, the samples of one step over all
    processes and accumulated micro-batches): the rest of an epoch, fewer samples than one step, is left
    out, so that no step averages a shorter batch (Accelerate would scale a short accumulation group's
    gradient down by the full group size)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool, step_samples: int = 1):
        self.num_samples, self.seed, self.shuffle, self.step_samples = num_samples, seed, shuffle, step_samples
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self):
        return iter(self.order(self.epoch)[self.start:self.start + len(self)].tolist())

    def __len__(self) -> int:
        left = self.num_samples - self.start
        return left - left % self.step_samples


class SampleIndices(Dataset):
    """Item i is just i: the loader batches indices, and GatherBatch turns each batch into images."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> int:
        return i


class GatherBatch:
    """collate_fn of the device pipeline: a list of indices -> uint8 images, labels and the sample indices
    themselves (per-sample randomness and resume checks key on them), with one indexing op."""

    def __init__(self, split: Split):
        self.split = split

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.split.images[index], self.split.labels[index], index


class PILImages(Dataset):
    """The tutorial's pipeline: one PIL image at a time through Resize + ToTensor (+ Normalize)."""

    def __init__(self, split: Split, image_size: int):
        self.split = split
        self.transform = transforms.Compose([
            transforms.Resize(image_size), transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,)),
        ])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        image = Image.fromarray(self.split.images[i].numpy(), mode="L")
        return self.transform(image), self.split.labels[i], i


def make_loader(split: Split, cfg, batch: BatchPlan, train: bool) -> tuple[DataLoader, EpochOrder]:
    """A DataLoader of batch.per_process samples over `split` in EpochOrder, before accelerator.prepare() shards
    it over batch.processes processes."""
    # Training leaves out the rest of an epoch that makes no whole optimizer step; evaluation keeps every
    # sample (gather_for_metrics removes the padding Accelerate adds to even out the ranks).
    order = EpochOrder(len(split), cfg.seed, shuffle=train, step_samples=batch.global_batch if train else 1)
    batches = BatchSampler(order, batch.per_process, drop_last=train)
    pin = use_cuda()
    # The loader draws its workers' base seed from this generator rather than from the global RNG, so
    # starting an epoch (or an evaluation) does not shift the dropout stream: resume stays exact.
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.pipeline == "device":
        loader = DataLoader(SampleIndices(len(split)), batch_sampler=batches, collate_fn=GatherBatch(split),
                            pin_memory=pin, generator=generator)
    else:
        loader = DataLoader(PILImages(split, cfg.image_size), batch_sampler=batches, pin_memory=pin,
                            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                            generator=generator)
    return loader, order


# ----------------------------------------------------------------------------- device transforms

def to_model_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Device pipeline: uint8 [B, 28, 28] -> normalized float [B, 1, S, S], as batched tensor ops.
    Batches from the torchvision pipeline are already float [B, 1, S, S] and pass through.

    The result is bilinear interpolation (align_corners=False, edges clamped, as F.interpolate and PIL
    compute it) of the normalized image. Normalizing first is exact (each output pixel is a weighted mean
    of input pixels) and touches 64 times fewer pixels at 224. The resize is two small matrix products
    (rows, then columns): on a CPU about five times faster than F.interpolate for one-channel images,
    and on a GPU two cheap batched GEMMs."""
    if images.dtype != torch.uint8:
        return images
    height, width = images.shape[-2:]
    return normalize_and_resize(images, resize_matrix(height, image_size, images.device),
                                resize_matrix(width, image_size, images.device))


def normalize_and_resize(images: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] -> float [B, 1, S, S]: scaled to [0, 1], normalized, then resized by the interpolation
    matrices of resize_matrix (rows [S, H], columns [S, W]). The exported ONNX graph runs this too."""
    x = images.float() * (1 / (255 * STD)) - MEAN / STD  # [B, H, W]
    x = torch.matmul(rows, x)  # [B, S, W]
    x = torch.matmul(x, columns.T)  # [B, S, S]
    return x.unsqueeze(1)


@functools.lru_cache(maxsize=16)
def resize_matrix(size_in: int, size_out: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[size_out, size_in] weights of 1-D bilinear interpolation with align_corners=False: output pixel i
    samples the input at (i + 0.5) * size_in / size_out - 0.5, clamped to the image, from its two neighbours."""
    position = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * size_in / size_out - 0.5).clamp(min=0)
    left = position.floor().long().clamp(max=size_in - 1)
    right = (left + 1).clamp(max=size_in - 1)
    weight_right = position - left
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, left), 1 - weight_right, accumulate=True)
    matrix.index_put_((rows, right), weight_right, accumulate=True)
    return matrix.float().to(device)


def training_input(batch, cfg, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch from the loader -> (model input, labels), on the batch's device: with
    cfg.augment, crop_flip on the uint8 images (per-sample choices fixed by seed, epoch and sample
    index), then to_model_input, then with cfg.random_erasing, random_erase on the model input."""
    images, labels, indices = batch
    if cfg.augment:
        images = crop_flip(images, indices, cfg.seed, epoch)
    inputs = to_model_input(images, cfg.image_size)
    if cfg.random_erasing > 0:
        inputs = random_erase(inputs, indices, cfg.seed, epoch, cfg.random_erasing)
    return inputs, labels


# ----------------------------------------------------------------------------- augmentation

def _mix(x):
    """A 32-bit integer hash (the lowbias32 construction), for Python ints and int64 tensors alike.
    The multipliers are below 2**31, so int64 products of 32-bit values never overflow."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK
    return x ^ (x >> 16)


def sample_hashes(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """32 random-looking bits per sample (int64 in [0, 2**32)), fixed by (seed, epoch, index)."""
    key = _mix(_mix(seed) ^ _mix(epoch + 0x9E3779B9))
    return _mix(_mix(indices.long() ^ key) + key)


def crop_flip(images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int, pad: int = PAD) -> torch.Tensor:
    """uint8 [B, H, W] -> uint8 [B, H, W]: each image padded with `pad` zero pixels on every side, cropped
    back to H x W at a per-sample offset, and mirrored left-right for about half the samples.

    Output pixel (i, j) of sample b is input pixel (i + dy[b], j' + dx[b]), zero when that is outside the
    image, where j' = W - 1 - j if sample b is flipped, else j."""
    h = sample_hashes(seed, epoch, indices.to(images.device))
    choices = 2 * pad + 1
    dy = (h >> 8) % choices - pad
    dx = (h >> 16) % choices - pad
    flipped = (h & 1).bool()
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device) + dy[:, None]  # [B, H] source row of each output row
    cols = torch.arange(width, device=images.device)
    cols = torch.where(flipped[:, None], cols.flip(0), cols) + dx[:, None]  # [B, W] source column
    padded = F.pad(images, (pad, pad, pad, pad))  # zeros: Fashion-MNIST's background is black
    batch = torch.arange(len(images), device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None] + pad, cols[:, None, :] + pad]


# torchvision.transforms.RandomErasing's defaults: the rectangle's area as a fraction of the image, its aspect
# ratio (height / width, drawn log-uniformly), and the attempts at a rectangle that fits before giving up.
ERASE_SCALE, ERASE_RATIO, ERASE_ATTEMPTS = (0.02, 0.33), (0.3, 3.3), 10
_ERASE_STREAM = 0x45524153  # keeps the erasing draws apart from crop_flip's bits of the same sample hash


def sample_uniforms(seed: int, epoch: int, indices: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """[B, count] float64 in [0, 1), fixed by (seed, epoch, index, stream): `count` independent-looking draws
    per sample, none of them shared with another stream."""
    keys = _mix(torch.arange(count, device=indices.device) + _mix(stream))  # [count]
    return _mix(sample_hashes(seed, epoch, indices)[:, None] ^ keys).double() / 2**32


def erase_boxes(size: int, indices: torch.Tensor, seed: int, epoch: int, p: float) -> tuple[torch.Tensor, ...]:
    """torchvision's RandomErasing choice for each sample of a size x size image: (erased, top, left, height,
    width), each [B]. With probability p a sample is erased; up to ten times an area fraction is drawn
    uniformly from ERASE_SCALE and an aspect ratio log-uniformly from ERASE_RATIO, the sides rounded, and the
    first rectangle smaller than the image in both sides is placed uniformly inside it; a sample none of whose
    ten fits is left alone (as torchvision does)."""
    u = sample_uniforms(seed, epoch, indices, 1 + 4 * ERASE_ATTEMPTS, _ERASE_STREAM)
    chosen = u[:, 0] < p
    area_u, ratio_u, top_u, left_u = u[:, 1:].reshape(-1, ERASE_ATTEMPTS, 4).unbind(-1)  # [B, attempts] each
    area = size * size * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * area_u)
    low, high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(low + (high - low) * ratio_u)
    height = torch.sqrt(area * aspect).round().long()
    width = torch.sqrt(area / aspect).round().long()
    fits = (height < size) & (width < size)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
    height, width = height.gather(1, first)[:, 0], width.gather(1, first)[:, 0]
    top = (top_u.gather(1, first)[:, 0] * (size - height + 1)).floor().long()
    left = (left_u.gather(1, first)[:, 0] * (size - width + 1)).floor().long()
    return chosen & fits.any(dim=1), top, left, height, width


def random_erase(inputs: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int, p: float) -> torch.Tensor:
    """Model input [B, C, S, S] -> the same with erase_boxes' rectangle of each erased sample set to 0 (the mean
    pixel after normalization: torchvision's default value=0 where it follows Normalize). One mask, one where."""
    size = inputs.shape[-1]
    erased, top, left, height, width = (t.to(inputs.device) for t in
                                        erase_boxes(size, indices.to(inputs.device), seed, epoch, p))
    position = torch.arange(size, device=inputs.device)
    rows = (position >= top[:, None]) & (position < (top + height)[:, None])  # [B, S]
    cols = (position >= left[:, None]) & (position < (left + width)[:, None])
    mask = erased[:, None, None] & rows[:, :, None] & cols[:, None, :]  # [B, S, S]
    return inputs.masked_fill(mask[:, None], 0.0)
