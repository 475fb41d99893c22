"""Input pipelines: the device pipeline gives the torchvision pipeline's tensors, the resize is exact
bilinear interpolation, and augmentation is a per-sample crop + flip fixed by (seed, epoch, sample index)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dist_alexnet.config import ConfigError, TrainConfig
from dist_alexnet.datasets import MEAN, STD, Split
from dist_alexnet.inputs import PAD, crop_flip, make_loader, to_model_input, training_input
from dist_alexnet.schedule import BatchPlan
from tests.helpers import tiny_config

# PIL resizes in fixed point and rounds its output to 8 bits: the pipelines differ by up to 1/255 of
# the [0, 1] range per pixel (measured: max exactly 1/255, mean about 0.3/255), i.e. 1 / (255 * STD)
# after normalization.
PIPELINE_TOLERANCE = 1 / (255 * STD) + 1e-5


def random_split(n: int, seed: int = 0) -> Split:
    generator = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
                 torch.randint(0, 10, (n,), generator=generator))


@pytest.mark.parametrize("image_size", [64, 224])
def test_device_and_torchvision_pipelines_give_the_same_tensors(image_size):
    split = random_split(96)
    cfg = tiny_config(image_size=image_size, batch_size=48, num_workers=0, seed=3)
    batch = BatchPlan.of(cfg, 1)
    device_loader, _ = make_loader(split, dataclasses.replace(cfg, pipeline="device"), batch, train=True)
    torchvision_loader, _ = make_loader(split, dataclasses.replace(cfg, pipeline="torchvision"), batch, train=True)
    for device_batch, torchvision_batch in zip(device_loader, torchvision_loader, strict=True):
        device_inputs, device_labels = training_input(device_batch, cfg, epoch=0)
        torchvision_inputs, torchvision_labels = training_input(torchvision_batch, cfg, epoch=0)
        assert device_inputs.shape == torchvision_inputs.shape == (48, 1, image_size, image_size)
        assert torch.equal(device_labels, torchvision_labels) and torch.equal(device_batch[2], torchvision_batch[2])
        difference = (device_inputs - torchvision_inputs).abs()
        assert difference.max() <= PIPELINE_TOLERANCE
        assert difference.mean() < 0.5 * PIPELINE_TOLERANCE  # mostly far below the worst case


@pytest.mark.parametrize("image_size", [28, 64, 100, 224, 227])
def test_resize_is_bilinear_interpolation_of_the_normalized_image(image_size):
    images = random_split(16).images
    expected = F.interpolate(images.unsqueeze(1).float() / 255, size=(image_size, image_size), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(to_model_input(images, image_size), (expected - MEAN) / STD, atol=2e-5, rtol=0)


def reference_crop_flip(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """The definition, one image at a time: pad with zeros, crop at (PAD + dy, PAD + dx), then mirror."""
    padded = F.pad(image, (PAD, PAD, PAD, PAD))
    crop = padded[PAD + dy: PAD + dy + 28, PAD + dx: PAD + dx + 28]
    return crop.flip(-1) if flip else crop


def test_augmentation_is_a_crop_and_flip_covering_every_choice():
    split = random_split(600)
    out = crop_flip(split.images, torch.arange(600), seed=0, epoch=0)
    assert out.shape == split.images.shape and out.dtype == torch.uint8
    choices = [(dy, dx, flip) for dy in range(-PAD, PAD + 1) for dx in range(-PAD, PAD + 1) for flip in (False, True)]
    seen = []
    for image, augmented in zip(split.images, out):
        matches = [c for c in choices if torch.equal(reference_crop_flip(image, *c), augmented)]
        assert len(matches) == 1
        seen.append(matches[0])
    assert set(seen) == set(choices)  # all 50 choices occur among 600 samples
    assert 0.4 < sum(flip for _, _, flip in seen) / len(seen) < 0.6


def test_augmentation_is_deterministic_per_seed_epoch_and_sample():
    split = random_split(64)
    indices = torch.arange(1000, 1064)
    first = crop_flip(split.images, indices, seed=7, epoch=2)
    assert torch.equal(first, crop_flip(split.images, indices, seed=7, epoch=2))
    assert not torch.equal(first, crop_flip(split.images, indices, seed=8, epoch=2))
    assert not torch.equal(first, crop_flip(split.images, indices, seed=7, epoch=3))
    # a sample's augmentation does not depend on its batch: any batching (so any world size) gives the same
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(crop_flip(split.images[order], indices[order], seed=7, epoch=2), first[order])
    assert torch.equal(crop_flip(split.images[:5], indices[:5], seed=7, epoch=2), first[:5])


def test_augmentation_differs_between_samples():
    same_image = random_split(1).images.expand(64, 28, 28)
    out = crop_flip(same_image, torch.arange(64), seed=0, epoch=0)
    distinct = {bytes(image.flatten().tolist()) for image in out}
    assert len(distinct) > 20


def test_training_input_augments_only_when_asked():
    split = random_split(32)
    batch = (split.images, split.labels, torch.arange(32))
    plain, labels = training_input(batch, tiny_config(), epoch=0)
    torch.testing.assert_close(plain, to_model_input(split.images, 64))
    augmented, _ = training_input(batch, tiny_config(augment=True, seed=1), epoch=0)
    torch.testing.assert_close(augmented, to_model_input(crop_flip(split.images, batch[2], 1, 0), 64))
    assert torch.equal(labels, split.labels)


def test_augment_needs_the_device_pipeline():
    with pytest.raises(ConfigError, match="--augment works on the device pipeline"):
        TrainConfig(augment=True, pipeline="torchvision").validate()
