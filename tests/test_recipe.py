"""The training recipe: the shipped real sample, the learning-rate schedules as TensorBoard records them, the
same optimization on 1 or 2 processes with --global-batch-size, gradient accumulation under DDP (and the
epoch's last, shorter group), --lr-scaling, and the weight average's place in checkpoints and evaluation."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dist_alexnet.checkpoint import list_checkpoints
from dist_alexnet.config import ConfigError, TrainConfig
from dist_alexnet.datasets import SAMPLE_DIR, SAMPLE_FILES, load_sample, read_idx
from dist_alexnet.optimization import LRSchedule
from dist_alexnet.schedule import BatchPlan
from tests.helpers import (REPO, assert_same_step, checkpoint_at, cpu_env, metrics, one_step_from, run,
                           samples_per_step, scalars, steps_per_epoch, tiny_config, train_tiny)

SHARED_SAMPLE = REPO.parent / "shared" / "fashion-mnist-sample"
PUBLISHED_SHA256 = {  # as Fashion-MNIST's sample README gives them
    "train-images-idx3-ubyte.gz": "cc4a4c7c0c180e9a23f3805a645bcb016c27b50e760098f34b159f93410b3a7a",
    "train-labels-idx1-ubyte.gz": "e49a727d885ce67376191491581ae7175a785f8fe6f79eb08331dec62a5d0cb8",
}


# ----------------------------------------------------------------------------- the shipped sample

def test_the_shipped_sample_is_the_published_one_with_its_license():
    for name in SAMPLE_FILES:
        assert hashlib.sha256((SAMPLE_DIR / name).read_bytes()).hexdigest() == PUBLISHED_SHA256[name], name
    assert "MIT License" in (SAMPLE_DIR / "LICENSE").read_text() and "Zalando" in (SAMPLE_DIR / "LICENSE").read_text()
    train, test = load_sample()
    assert (len(train), len(test)) == (3000, 615)
    assert train.images.shape == (3000, 28, 28) and train.images.dtype == torch.uint8
    for part in (train, test):
        assert set(part.labels.tolist()) == set(range(10))  # every class in both parts
    assert train.labels.bincount().tolist() == [282, 321, 290, 312, 303, 300, 298, 312, 287, 295]


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="the shared copy of the sample is not on this machine "
                                                         "(the published checksums are checked above)")
def test_the_shipped_sample_equals_the_shared_files():
    train, test = load_sample()
    images = read_idx(SHARED_SAMPLE / SAMPLE_FILES[0], 3)
    labels = read_idx(SHARED_SAMPLE / SAMPLE_FILES[1], 1)
    assert torch.equal(torch.cat([train.images, test.images]), images)  # the first 3,615 images, in order
    assert torch.equal(torch.cat([train.labels, test.labels]), labels.long())


def test_a_short_run_on_the_real_sample_learns_well_above_chance(tmp_path):
    run_dir = tmp_path / "run"
    run(["--dataset", "fashion-mnist-sample", "--image-size", "64", "--model-width", "0.25", "--batch-size", "32",
         "--epochs", "2", "--no-log-figures", "--output-dir", str(run_dir)])
    m = metrics(run_dir)
    assert m["test_samples"] == 615 and m["steps"] == 2 * (3000 // 32)
    assert m["test_acc"] > 0.5, m["test_acc"]  # chance is 0.1


# ----------------------------------------------------------------------------- the presets

def test_every_preset_is_a_valid_train_config():
    from dist_alexnet.config import load_yaml

    presets = sorted((REPO / "launch" / "configs").glob("*.yaml"))
    assert {path.name for path in presets} >= {"accurate.yaml", "fast.yaml", "long.yaml"}
    for path in presets:
        TrainConfig(**load_yaml(path)).validate()


def test_compare_recipes_gives_a_global_batch_preset_its_global_batch():
    """compare_recipes passes --batch-size as --global-batch-size to long.yaml (train refuses both at once), and
    what it builds is a valid run whose learning rate the preset's sqrt scaling sets."""
    import importlib.util

    from dist_alexnet.cli import build_parser
    from dist_alexnet.config import config_from_args

    spec = importlib.util.spec_from_file_location("compare_recipes", REPO / "scripts" / "compare_recipes.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    long, accurate = str(REPO / "launch" / "configs" / "long.yaml"), str(REPO / "launch" / "configs" / "accurate.yaml")
    assert compare.batch_flag(long) == "--global-batch-size" and compare.batch_flag(accurate) == "--batch-size"
    args = build_parser().parse_args(["train", "--config", long, "--dataset", "fashion-mnist-sample", "--epochs", "6",
                                      "--image-size", "64", compare.batch_flag(long), "64"])
    cfg = config_from_args(args)
    batch = BatchPlan.of(cfg, 1)
    assert (batch.global_batch, cfg.lr_schedule, cfg.random_erasing, cfg.augment) == (64, "onecycle", 0.2, True)
    assert batch.lr(cfg) == pytest.approx(1.4e-3 * math.sqrt(64 / 128))


# ----------------------------------------------------------------------------- learning-rate schedules

def test_the_learning_rate_in_tensorboard_follows_warmup_then_cosine(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    lr, min_lr, warmup = 2e-3, 1e-4, 4
    train_tiny(run_dir, data_dir, "--epochs", "2", "--lr", str(lr), "--lr-schedule", "cosine", "--warmup-steps",
               str(warmup), "--min-lr", str(min_lr), "--log-every", "1", "--max-steps", "40")
    logged = dict(scalars(run_dir, "train/lr"))
    total = 2 * steps_per_epoch()  # the schedule spans --epochs, not --max-steps
    assert sorted(logged) == list(range(1, 41))
    for step in (1, 2, 4):  # linear warmup
        assert logged[step] == pytest.approx(lr * step / warmup, rel=1e-6)
    for step in (5, 20, 40):
        progress = (step - warmup) / (total - warmup)
        assert logged[step] == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2, rel=1e-6)
    assert all(logged[s] > logged[s + 1] for s in range(warmup, 40))  # falling after the warmup


def test_schedules_start_and_end_where_they_should():
    cfg = TrainConfig(lr=1e-2, lr_schedule="onecycle", min_lr=1e-5, epochs=10).validate()
    onecycle = LRSchedule.plan(cfg, cfg.lr, steps_per_epoch=100)
    assert onecycle.warmup_steps == 300  # 30% of the run by default
    assert onecycle.lr(0) == pytest.approx(1e-2 / 25, rel=1e-3)
    assert onecycle.lr(299) == pytest.approx(1e-2) and onecycle.lr(999) == pytest.approx(1e-5)
    constant = LRSchedule.plan(TrainConfig(warmup_epochs=0.5).validate(), 1e-3, steps_per_epoch=10)
    assert [constant.lr(s) for s in (0, 4, 5, 29)] == pytest.approx([2e-4, 1e-3, 1e-3, 1e-3])


def test_a_warmup_as_long_as_the_run_is_refused(tmp_path, data_dir):
    result = train_tiny(tmp_path / "run", data_dir, "--epochs", "1", "--warmup-steps", "32", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("dist-alexnet: error: the warmup (32 steps) is as long as the whole run "
                                     "(32 optimizer steps in --epochs 1); shorten --warmup-steps or --warmup-epochs")


def test_lr_scaling_scales_from_the_reference_batch_to_the_global_batch(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = train_tiny(run_dir, data_dir, "--max-steps", "2", "--log-every", "1", "--lr-scaling", "linear",
                        "--lr-reference-batch", "16")
    assert "learning rate 0.002 (--lr 0.001 scaled linear from batch 16 to 32)" in result.stdout
    assert [lr for _, lr in scalars(run_dir, "train/lr")] == pytest.approx([2e-3, 2e-3])
    cfg = TrainConfig(lr_scaling="sqrt", batch_size=128).validate()
    assert BatchPlan.of(cfg, 4).lr(cfg) == pytest.approx(2e-3)


def test_the_global_batch_must_divide_by_processes_and_accumulation():
    with pytest.raises(ConfigError, match=r"--global-batch-size 100 does not divide by 1 process\(es\) x "
                                          r"--grad-accum 3 = 3: use a multiple of 3 \(e.g. 99 or 102\)"):
        BatchPlan.of(TrainConfig(global_batch_size=100, grad_accum=3).validate(), 1)


# ----------------------------------------------------------------------------- the same optimization on 1 or 2

# Two ways of making the same steps: the same samples in every step, exactly (the sample log), and the same step from
# the same state to float32 rounding (assert_same_step: compared one step at a time, as rounding compounds).

def train_logging_samples(run_dir, data_dir, *args, processes):
    """A run and the samples of each of its steps."""
    log_dir = run_dir.with_name(f"{run_dir.name}-samples")
    result = train_tiny(run_dir, data_dir, *args, processes=processes, env=cpu_env(DIST_ALEXNET_SAMPLE_LOG=log_dir))
    return samples_per_step(log_dir), result.stdout


@pytest.mark.slow
def test_global_batch_size_gives_the_same_run_on_one_and_two_processes(tmp_path, data_dir):
    args = ["--global-batch-size", "32", "--dropout", "0", "--epochs", "1", "--log-every", "1", "--max-steps", "3",
            "--checkpoint-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    samples, _ = train_logging_samples(one, data_dir, *args, processes=1)
    samples_of_two, out = train_logging_samples(two, data_dir, *args, processes=2)
    assert "global batch 32" in out and "not scaled" not in out
    assert samples_of_two == samples and [len(indices) for indices in samples.values()] == [32] * 3
    assert_same_step(checkpoint_at(one, 1), checkpoint_at(two, 1))


@pytest.mark.slow
def test_gradient_accumulation_under_ddp_equals_the_bigger_batch_and_leaves_an_epochs_short_rest_out(tmp_path,
                                                                                                      data_dir):
    """2 processes x 3 micro-batches of 8 = 2 processes x 24. 1024 samples in steps of 48: 21 whole steps, the
    last 16 samples left out, as a batch of 2 x 24 leaves them out; so every step averages 48 samples, the last
    one too, and the next epoch's groups start afresh: the same samples in every step, and the first step of the
    second epoch taken from the same state (the epoch's end) is the same step."""
    common = ["--dropout", "0", "--epochs", "2", "--log-every", "1", "--max-steps", "22"]
    accumulated, plain = tmp_path / "accumulated", tmp_path / "plain"
    samples, _ = train_logging_samples(accumulated, data_dir, *common, "--batch-size", "8", "--grad-accum", "3",
                                       processes=2)
    assert samples == train_logging_samples(plain, data_dir, *common, "--batch-size", "24", processes=2)[0]
    assert [key for key in samples] == [(0, step) for step in range(1, 22)] + [(1, 22)]
    assert all(len(indices) == 48 for indices in samples.values())
    state = json.loads((checkpoint_at(accumulated, 21) / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["position"]) == (21, 1, 0)
    accumulated_step, _ = one_step_from(checkpoint_at(plain, 21), tmp_path / "accumulated_step", data_dir, *common,
                                        "--batch-size", "8", "--grad-accum", "3", processes=2)
    assert_same_step(accumulated_step, checkpoint_at(plain, 22), before=checkpoint_at(plain, 21))


# ----------------------------------------------------------------------------- the weight average

def test_the_weight_average_is_evaluated_checkpointed_and_exported(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    train_tiny(run_dir, data_dir, "--epochs", "1", "--ema-decay", "0.9")
    checkpoint = list_checkpoints(run_dir)[-1]
    average, weights = load_file(checkpoint / "ema.safetensors"), load_file(checkpoint / "model.safetensors")
    assert average.keys() == weights.keys() and any(not torch.equal(average[k], weights[k]) for k in average)
    m = metrics(run_dir)
    assert "raw_test_acc" in m
    assert [v for _, v in scalars(run_dir, "test/raw_acc")] == pytest.approx([m["raw_test_acc"]])
    # evaluate, and an export, use the average: the run's own figure
    evaluated = json.loads(run(["--checkpoint", str(checkpoint), "--json"], subcommand="evaluate").stdout)
    assert evaluated["test_acc"] == m["test_acc"] and evaluated["test_loss"] == m["test_loss"]
    run(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")], subcommand="export")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert all(torch.equal(exported[k], average[k]) for k in average)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16's gradient scaler runs only on CUDA and this "
                                                          "machine has no usable GPU")
def test_a_step_the_gradient_scaler_skipped_is_not_applied(monkeypatch):
    """fp16 on a real GradScaler: an inf gradient makes it skip the update, and train_step says so (the loop then
    leaves the schedule's clock and the weight average where they were)."""
    from accelerate import Accelerator

    from dist_alexnet.model import build_model
    from dist_alexnet.optimization import make_optimizer
    from dist_alexnet.stats import StepStats
    from dist_alexnet.parallel import DataParallel
    from dist_alexnet.steps import TrainStep

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    cfg = tiny_config(mixed_precision="fp16").validate()
    accelerator = Accelerator(mixed_precision="fp16")
    model = build_model(cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, make_optimizer(cfg, model, cfg.lr))
    first = next(model.parameters())
    inputs = torch.randn(8, 1, 64, 64, device=accelerator.device)
    labels = torch.randint(0, 10, (8,), device=accelerator.device)
    train_step = TrainStep(model, optimizer, accelerator, DataParallel(accelerator), StepStats(accelerator))
    handle = first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    end = train_step(inputs, labels)
    handle.remove()
    assert end is not None and not end.applied
    assert train_step(inputs, labels).applied
