"""`dist-alexnet benchmark` and `make gpu-check` on the CPU: FLOPs from layer shapes, every JSON field,
ratios that make sense, input errors, and the GPU check script end to end at toy sizes."""

import json
import math
import os

import pytest

import torch
from torch import nn

from dist_alexnet.perf.measure import backward_flops_by_layer, training_flops
from dist_alexnet.cli import main
from dist_alexnet.model import AlexNet
from tests.helpers import BIN, REPO, cpu_env, run, run_process

BENCHMARK_FIELDS = {
    "device", "device_name", "torch_version", "image_size", "batch_size", "mixed_precision", "compile", "augment",
    "model_width", "steps", "windows", "warmup", "cpu_threads", "torchvision_workers",
    "model_images_per_sec", "trainer_images_per_sec", "torchvision_trainer_images_per_sec",
    "device_pipeline_images_per_sec", "torchvision_pipeline_images_per_sec", "trainer_over_model",
    "torchvision_trainer_over_model", "pipeline_speedup", "pipeline_speedup_per_core", "pipeline_cores",
    "forward_flops_per_image", "train_flops_per_image", "trainer_tflops", "model_tflops", "peak_tflops",
    "peak_source", "mfu", "model_mfu", "peak_memory_gib", "host_syncs_per_trainer_step", "windows_images_per_sec",
}
RATES = ("model", "trainer", "torchvision_trainer", "device_pipeline", "torchvision_pipeline")
TOY = ["--image-size", "64", "--model-width", "0.125", "--batch-size", "8", "--num-workers", "1"]


def layer_shape_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass from the shapes every Conv2d and Linear produces."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        per_output = (module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                      if isinstance(module, nn.Conv2d) else module.in_features)
        macs += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return macs


def test_pytorchs_flop_count_at_224_agrees_with_the_layer_shapes():
    # output height x width x channels x (input channels x kernel area) per conv; in x out per linear
    expected = (55 * 55 * 96 * (1 * 11 * 11) + 27 * 27 * 256 * (96 * 5 * 5) + 13 * 13 * 384 * (256 * 3 * 3)
                + 13 * 13 * 384 * (384 * 3 * 3) + 13 * 13 * 256 * (384 * 3 * 3)
                + 9216 * 4096 + 4096 * 4096 + 4096 * 10)
    assert round(expected / 1e9, 2) == 1.06  # GMAC forward
    counted = training_flops(1.0, 224)
    assert counted["forward"] == 2 * expected
    # a training step is "3 forward passes" but for the first convolution's input gradient, never computed:
    # 6.295 GFLOP, 1.1% below the rule's 6.366 (the tolerance stated: within 1.5% of it)
    conv1 = 55 * 55 * 96 * 121
    assert counted["training"] == 6 * expected - 2 * conv1
    assert abs(counted["training"] / (6 * expected) - 1) < 0.015
    # per layer (the scaling model's backward timeline): the first convolution's backward is its weight gradient
    # alone, as many FLOPs as its forward; every other layer's is twice its forward
    layers = backward_flops_by_layer(1.0, 224)
    assert layers["features.0"] == 2 * conv1 and layers["classifier.1"] == 2 * 2 * 9216 * 4096
    assert sum(layers.values()) == counted["training"] - counted["forward"]


def test_flop_count_follows_the_model_at_other_sizes():
    assert training_flops(0.125, 100)["forward"] == 2 * layer_shape_macs(AlexNet(width=0.125), 100)


def check_benchmark_json(result: dict) -> None:
    assert set(result) >= BENCHMARK_FIELDS
    for name in RATES:
        rate = result[f"{name}_images_per_sec"]
        assert math.isfinite(rate) and rate > 0
        assert len(result["windows_images_per_sec"][name]) == result["windows"]
    for ratio in ("trainer_over_model", "torchvision_trainer_over_model", "pipeline_speedup",
                  "pipeline_speedup_per_core"):
        assert math.isfinite(result[ratio]) and result[ratio] > 0
    assert math.isclose(result["trainer_over_model"],
                        result["trainer_images_per_sec"] / result["model_images_per_sec"])
    assert math.isclose(result["pipeline_speedup"], result["device_pipeline_images_per_sec"]
                        / result["torchvision_pipeline_images_per_sec"])
    assert result["train_flops_per_image"] == training_flops(result["model_width"], result["image_size"])["training"]
    assert result["forward_flops_per_image"] < result["train_flops_per_image"] < 3 * result["forward_flops_per_image"]


def test_benchmark_writes_every_field_and_prints_its_table(tmp_path):
    out = tmp_path / "bench.json"
    result = run([*TOY, "--steps", "2", "--windows", "2", "--warmup", "1", "--augment", "--device", "cpu",
                  "--peak-tflops", "0.5", "--json", str(out)], subcommand="benchmark", timeout=120)
    r = json.loads(out.read_text())
    check_benchmark_json(r)
    assert (r["device"], r["augment"], r["batch_size"], r["mixed_precision"]) == ("cpu", True, 8, "no")
    assert r["peak_tflops"] == 0.5 and math.isclose(r["mfu"], r["trainer_tflops"] / 0.5)
    assert r["peak_memory_gib"] is None and r["host_syncs_per_trainer_step"] is None  # CUDA only
    assert "(b) trainer step, device pipeline" in result.stdout and "trainer_over_model (b/a)" in result.stdout


def test_benchmark_input_errors_are_one_line_each(capsys):
    assert main(["benchmark", "--steps", "0", "--image-size", "32", "--peak-tflops", "-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["dist-alexnet: error: --steps must be >= 1 (got 0)",
                     "dist-alexnet: error: --peak-tflops must be a positive number (got -1.0)",
                     "dist-alexnet: error: --image-size must be >= 64 so AlexNet's feature map stays at least "
                     "1x1 before pooling (got 32)"]


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    folder = tmp_path / "check"
    env = cpu_env(GPU_CHECK_DIR=folder, PYTHON=BIN / "python", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    result = run_process(["bash", str(REPO / "scripts/gpu_check.sh")], env, tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "toy sizes on the CPU" in result.stdout

    for name, compiled in (("benchmark-b16", False), ("benchmark-b16-compile", True)):
        r = json.loads((folder / f"{name}.json").read_text())
        check_benchmark_json(r)
        assert r["compile"] is compiled and r["mixed_precision"] == "bf16" and r["mfu"] is None
        assert "dist-alexnet benchmark |" in (folder / f"{name}.log").read_text()

    train = json.loads((folder / "train-metrics.json").read_text())
    assert train["epochs"] == 3 and len(train["epoch_seconds"]) == 3 and train["mixed_precision"] == "bf16"
    config = (folder / "train-run" / "config.yaml").read_text()
    assert "augment: true" in config and "batch_size: 32" in config  # fast.yaml, with the toy batch on top

    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"benchmark-b16", "benchmark-b16-compile"}
    assert summary["train"]["epoch_seconds"] == train["epoch_seconds"]
    targets = summary["targets"]
    assert targets["trainer images/s >= 40000 at the largest batch"]["met"] is False  # a CPU is no H200
    assert targets["slowest epoch after the first <= 1.5 s"]["value"] == max(train["epoch_seconds"][1:])


@pytest.mark.parametrize("subcommand", ["benchmark", "scaling-model"])
def test_an_output_path_that_cannot_be_written_is_refused_before_measuring(subcommand, tmp_path):
    refused = run(["--json", str(tmp_path)], subcommand=subcommand, check=False)
    assert refused.returncode == 2 and "is a directory; give a file path" in refused.stderr, refused.stderr
    assert "measuring" not in refused.stdout and "efficiency" not in refused.stdout
