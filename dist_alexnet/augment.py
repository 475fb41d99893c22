"""Training-time augmentation as batch ops on the device: random crop with zero padding, horizontal flip.

Each sample's choice (a shift of -PAD..PAD pixels in each direction, flipped or not) is a pure function
of (seed, epoch, sample index), computed by integer hashing on the batch's device. Nothing is drawn
from a random generator, so there is no generator state to save or to keep in step across processes:
a sample is augmented the same way whichever process and batch it lands in (results do not depend on
the world size), and a run resumed mid-epoch applies exactly the augmentations the uninterrupted run
would have. It runs on the 28x28 uint8 images, before the resize: 64 times fewer pixels than at 224.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 2  # pixels of zero padding on each side of a 28x28 image before the random 28x28 crop
_MASK = 0xFFFFFFFF


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
