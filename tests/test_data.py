"""IDX files: reading, validation errors that name the file, the synthetic set, loader order, transforms."""

import pytest
import torch

from dist_alexnet.datasets import (IDX_FILES, MEAN, STD, DataError, load_split, make_synthetic, read_idx,
                                   synthetic_samples, write_idx)
from dist_alexnet.inputs import EpochOrder, to_model_input
from tests.helpers import corrupt_count, corrupt_label, corrupt_magic, corrupt_shape, corrupt_truncate


def small_dataset(root, n=20, labels=None):
    raw = root / "FashionMNIST" / "raw"
    for train in (True, False):
        images_file, labels_file = (raw / name for name in IDX_FILES[train])
        write_idx(images_file, torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8))
        write_idx(labels_file, labels if labels is not None else torch.arange(n, dtype=torch.uint8) % 10)
    return raw


def test_idx_round_trip(tmp_path):
    array = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "x", array)
    assert torch.equal(read_idx(tmp_path / "x", 3), array)
    # the torchvision layout: magic 0x00000803, then the three sizes big-endian
    assert (tmp_path / "x").read_bytes()[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 7, 0, 0, 0, 28, 0, 0, 0, 28])


def test_load_split_reads_through_torchvision(tmp_path):
    small_dataset(tmp_path)
    split = load_split(tmp_path, train=True, download=False)
    assert split.images.shape == (20, 28, 28) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == [i % 10 for i in range(20)]


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_magic, corrupt_count, corrupt_label, corrupt_shape])
def test_bad_idx_files_give_a_clear_error_naming_the_file(tmp_path, corrupt):
    raw = small_dataset(tmp_path)
    bad_file, words = corrupt(raw)
    with pytest.raises(DataError) as err:
        load_split(tmp_path, train=True, download=False)
    assert str(bad_file) in str(err.value) and words in str(err.value)


def test_missing_files_without_download_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="--dataset synthetic"):
        load_split(tmp_path, train=True, download=False)


def test_synthetic_set_is_deterministic_for_a_seed():
    a = synthetic_samples(50, torch.Generator().manual_seed(3))
    b = synthetic_samples(50, torch.Generator().manual_seed(3))
    c = synthetic_samples(50, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_synthetic_files_are_deterministic_and_loadable(tmp_path):
    make_synthetic(tmp_path / "a", 300, 50, seed=1)
    make_synthetic(tmp_path / "b", 300, 50, seed=1)
    for name in [n for pair in IDX_FILES.values() for n in pair]:
        assert (tmp_path / "a/FashionMNIST/raw" / name).read_bytes() == (tmp_path / "b/FashionMNIST/raw" / name).read_bytes()
    split = load_split(tmp_path / "a", train=False, download=False)
    assert len(split) == 50 and set(split.labels.tolist()) <= set(range(10))


def test_synthetic_classes_are_learnable_but_not_trivial():
    images, labels = synthetic_samples(3000, torch.Generator().manual_seed(0))
    x = images.float().flatten(1) / 255
    train, test = slice(0, 2500), slice(2500, None)
    means = torch.stack([x[train][labels[train] == k].mean(0) for k in range(10)])
    acc = (torch.cdist(x[test], means).argmin(1) == labels[test]).float().mean().item()
    assert 0.35 < acc < 0.9, acc  # far above chance (0.1) for the simplest classifier, far from solved


def test_epoch_order_depends_on_seed_and_epoch_and_resumes_at_a_position():
    order = EpochOrder(100, seed=5, shuffle=True)
    first = list(order)
    assert sorted(first) == list(range(100))
    order.set_position(epoch=1)
    second = list(order)
    assert second != first and sorted(second) == list(range(100))
    order.set_position(epoch=1, start=37)
    assert list(order) == second[37:] and len(order) == 63
    assert list(EpochOrder(100, seed=5, shuffle=True)) == first
    assert list(EpochOrder(10, seed=5, shuffle=False)) == list(range(10))


def test_device_transform_resizes_and_normalizes():
    images = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    x = to_model_input(images, 64)
    assert x.shape == (3, 1, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, (1 - MEAN) / STD))
