"""--random-erasing: torchvision's RandomErasing on the model input, each sample's rectangle a pure function of
(seed, epoch, sample index), so it does not depend on the batch a sample lands in (nor on the world size) and a
resumed run erases what the uninterrupted one would have."""

from __future__ import annotations

import pytest
import torch

from dist_alexnet.config import ConfigError, TrainConfig
from dist_alexnet.inputs import erase_boxes, random_erase, to_model_input, training_input
from tests.helpers import tiny_config

SIZE = 64


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, 1, SIZE, SIZE)


def test_erasing_is_deterministic_per_seed_epoch_and_sample():
    indices = torch.arange(256)
    first = random_erase(ones(256), indices, seed=3, epoch=1, p=0.5)
    assert torch.equal(first, random_erase(ones(256), indices, seed=3, epoch=1, p=0.5))
    assert not torch.equal(first, random_erase(ones(256), indices, seed=4, epoch=1, p=0.5))
    assert not torch.equal(first, random_erase(ones(256), indices, seed=3, epoch=2, p=0.5))


def test_erasing_does_not_depend_on_the_batch_a_sample_is_in():
    indices = torch.arange(1000, 1256)
    whole = random_erase(ones(256), indices, seed=0, epoch=0, p=0.5)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(random_erase(ones(256), indices[order], seed=0, epoch=0, p=0.5), whole[order])
    assert torch.equal(random_erase(ones(7), indices[100:107], seed=0, epoch=0, p=0.5), whole[100:107])


def test_erased_rectangles_follow_randomerasing_ranges_and_statistics():
    from torchvision.transforms import RandomErasing

    n, p = 20_000, 0.5
    erased, top, left, height, width = erase_boxes(SIZE, torch.arange(n), seed=0, epoch=0, p=p)
    assert abs(erased.float().mean().item() - p) < 0.02  # torchvision too leaves out the rare sample no try fits
    h, w = height[erased].double(), width[erased].double()
    fraction = h * w / SIZE**2
    assert fraction.min() >= 0.015 and fraction.max() <= 0.35  # 0.02-0.33, give or take the rounding of the sides
    assert (h / w).min() >= 0.25 and (h / w).max() <= 3.8  # 0.3-3.3, idem
    assert (top[erased] + height[erased] <= SIZE).all() and (left[erased] + width[erased] <= SIZE).all()
    assert ((h / w).log().mean()).abs() < 0.05  # log-uniform aspect ratio: symmetric around 1

    # The erased area per image against torchvision's own transform, on images of ones (value 0, its default)
    torch.manual_seed(0)
    reference = RandomErasing(p=1.0)
    theirs = torch.stack([1 - reference(image).mean() for image in ones(4000)])
    ours = 1 - random_erase(ones(4000), torch.arange(4000), seed=1, epoch=0, p=1.0).mean(dim=(1, 2, 3))
    assert abs(ours.mean().item() - theirs.mean().item()) < 0.01, (ours.mean(), theirs.mean())
    assert abs(ours.std().item() - theirs.std().item()) < 0.01, (ours.std(), theirs.std())


def test_erasing_sets_exactly_the_rectangle_to_zero_and_leaves_the_rest():
    indices = torch.arange(64)
    inputs = torch.randn(64, 1, SIZE, SIZE) + 5  # no zeros of its own
    out = random_erase(inputs, indices, seed=2, epoch=0, p=1.0)
    erased, top, left, height, width = erase_boxes(SIZE, indices, seed=2, epoch=0, p=1.0)
    for b in range(64):
        expected = inputs[b].clone()
        if erased[b]:
            expected[:, top[b]:top[b] + height[b], left[b]:left[b] + width[b]] = 0
        assert torch.equal(out[b], expected)
    assert erased.float().mean() > 0.9


def test_probability_zero_changes_nothing():
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    batch = (images, torch.zeros(32, dtype=torch.long), torch.arange(32))
    plain, _ = training_input(batch, tiny_config(image_size=SIZE), epoch=0)
    assert torch.equal(plain, to_model_input(images, SIZE))
    assert torch.equal(random_erase(plain, batch[2], seed=0, epoch=0, p=0.0), plain)
    erased, _ = training_input(batch, tiny_config(image_size=SIZE, random_erasing=1.0), epoch=0)
    assert not torch.equal(erased, plain)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_random_erasing_must_be_a_probability(p):
    with pytest.raises(ConfigError, match="--random-erasing"):
        TrainConfig(random_erasing=p).validate()
