"""`dist-alexnet benchmark`: where the time goes, measured side by side in one process.

  (r) reference            what torch alone offers, sharing no code with the trainer: a plain AlexNet, plain
                           torch.optim.Adam(fused=True) (foreach where torch has no fused kernel), torch's
                           autocast, one batch made once on the device. trainer / reference below 1 is the
                           trainer's own cost, optimizer and set-up included
  (a) model                the training step alone (forward, backward, Adam) on one batch made once on
                           the device: the ceiling for this model on this hardware
  (b) trainer              the trainer's own step (steps.TrainStep, with its per-step stop check) fed by
                           the trainer's loader with the device pipeline: uint8 batches, resize /
                           normalize (/ augment) on the device
  (c) torchvision_trainer  the same step fed by the tutorial's pipeline (PIL Resize + ToTensor per image
                           in --num-workers DataLoader workers)
  (d) the two input pipelines alone: batches delivered to the device, ready for the model

(a)-(d) share one Accelerator, one model and one optimizer, set up by the trainer's own functions.
Each first runs --warmup untimed steps (torch.compile, cuDNN autotuning, worker start-up). Then, in each
of --windows rounds, every measurement runs --steps timed steps, one after the other, so that load from
elsewhere on the machine falls on all of them alike; a figure is the median over its windows. On CUDA a
window starts and ends with a synchronize. Before a torchvision window the batches its workers prepared
while the other measurements ran are taken off untimed, so the window sees the pipeline's sustained rate.
The images are random: throughput does not depend on what they show.

FLOPs per image are counted by PyTorch's FlopCounterMode over a real training step (forward and backward):
6.295 GFLOP at 224, 1.1% below the "3 forward passes" rule, which also counts the first convolution's input
gradient that backward never computes. MFU = achieved FLOP/s / the device's dense peak.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from dist_alexnet.config import ConfigError, TrainConfig, check_output_file, config_from_args, options_for
from dist_alexnet.datasets import Split
from dist_alexnet.distributed import make_accelerator
from dist_alexnet.device import use_cuda
from dist_alexnet.inputs import make_loader, to_model_input, training_input
from dist_alexnet.schedule import BatchPlan
from dist_alexnet.model import AlexNet, build_model
from dist_alexnet.optimization import make_optimizer, optimizer_implementation
from dist_alexnet.parallel import DataParallel
from dist_alexnet.perf.measure import training_flops
from dist_alexnet.perf.scaling_benchmark import format_scaling, run_scaling
from dist_alexnet.rundir import write_atomically
from dist_alexnet.stats import StepStats
from dist_alexnet.steps import TrainStep

NUM_IMAGES = 60_000  # the size of Fashion-MNIST's training set
PREFETCH_FACTOR = 2  # batches each DataLoader worker prepares ahead (PyTorch's default)

# Dense (no sparsity) tensor-core peak in TFLOP/s: (bf16 and fp16, tf32 for fp32 runs, since cuDNN uses TF32
# for fp32 convolutions by default). From the vendors' data sheets; the first name found in the device name wins.
PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
}

KINDS = {  # key in the JSON -> label in the table
    "reference": "(r) plain torch loop, fused Adam, no trainer code",
    "model": "(a) model step alone, batch made once on the device",
    "trainer": "(b) trainer step, device pipeline",
    "torchvision_trainer": "(c) trainer step, torchvision pipeline",
    "device_pipeline": "(d) device pipeline alone",
    "torchvision_pipeline": "(d) torchvision pipeline alone",
}


def peak_tflops(device: torch.device, mixed_precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for a CUDA device in the table, else (None, why not)."""
    if device.type != "cuda":
        return None, f"no peak known for {device.type}; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (tf32 if mixed_precision == "no" else half), f"table: {key}"
    return None, f"{name} is not in the table; pass --peak-tflops"


def endless(loader, order):
    """(epoch, batch) forever, epoch after epoch, as the training loop walks the loader."""
    epoch = 0
    while True:
        order.set_position(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def model_step(model, optimizer, accelerator, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """The training step and nothing else: forward, loss, backward, Adam."""
    loss = F.cross_entropy(model(inputs), labels)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_benchmark(cfg: TrainConfig, steps: int = 10, windows: int = 5, warmup: int = 3,
                  peak: float | None = None) -> dict:
    """Measure (a)-(d) for cfg's image size, batch size, precision, model width, compile and augment, on
    the device Accelerate picks (CUDA when available, unless ACCELERATE_USE_CPU=1)."""
    accelerator = make_accelerator(cfg)
    measurements, before_torchvision_window = make_measurements(cfg, accelerator)
    rates, peak_bytes = time_interleaved(measurements, before_torchvision_window, accelerator.device,
                                         cfg.batch_size, steps, windows, warmup)
    host_syncs = count_host_syncs(measurements["trainer"], steps) if accelerator.device.type == "cuda" else None
    return benchmark_results(cfg, accelerator, rates, peak_bytes, host_syncs,
                             dict(steps=steps, windows=windows, warmup=warmup), peak)


def make_measurements(cfg: TrainConfig, accelerator) -> tuple[dict, object]:
    """The five measurements as functions of one step each, sharing one model and optimizer built and prepared
    by the trainer's own functions; and the function that takes off, untimed, the batches the torchvision
    workers prepared while the other measurements ran."""
    dev = accelerator.device
    generator = torch.Generator().manual_seed(cfg.seed)
    split = Split(torch.randint(0, 256, (NUM_IMAGES, 28, 28), dtype=torch.uint8, generator=generator),
                  torch.randint(0, 10, (NUM_IMAGES,), generator=generator))
    device_cfg = dataclasses.replace(cfg, pipeline="device")
    torchvision_cfg = dataclasses.replace(cfg, pipeline="torchvision", augment=False)
    batch = BatchPlan.of(cfg, 1)
    device_loader, device_order = make_loader(split, device_cfg, batch, train=True)
    torchvision_loader, torchvision_order = make_loader(split, torchvision_cfg, batch, train=True)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dev)
    optimizer = make_optimizer(cfg, model, cfg.lr)
    model, optimizer, device_loader, torchvision_loader = accelerator.prepare(
        model, optimizer, device_loader, torchvision_loader)
    device_batches = endless(device_loader, device_order)
    torchvision_batches = endless(torchvision_loader, torchvision_order)
    fixed_inputs = to_model_input(split.images[:cfg.batch_size].to(dev), cfg.image_size)
    fixed_labels = split.labels[:cfg.batch_size].to(dev)
    train_step = TrainStep(model, optimizer, accelerator, DataParallel(accelerator), StepStats(accelerator))

    def pipeline(batches, step_cfg):
        def step():
            epoch, batch = next(batches)
            training_input(batch, step_cfg, epoch)
        return step

    def trainer(batches, step_cfg):
        def step():
            epoch, batch = next(batches)
            inputs, labels = training_input(batch, step_cfg, epoch)
            train_step(inputs, labels)
        return step

    def skip_prepared_batches():
        for _ in range(cfg.num_workers * PREFETCH_FACTOR):
            next(torchvision_batches)

    measurements = {
        "reference": reference_step(cfg, dev, accelerator.mixed_precision, fixed_inputs, fixed_labels),
        "model": lambda: model_step(model, optimizer, accelerator, fixed_inputs, fixed_labels),
        "trainer": trainer(device_batches, device_cfg),
        "torchvision_trainer": trainer(torchvision_batches, torchvision_cfg),
        "device_pipeline": pipeline(device_batches, device_cfg),
        "torchvision_pipeline": pipeline(torchvision_batches, torchvision_cfg),
    }
    return measurements, skip_prepared_batches


def reference_step(cfg: TrainConfig, device: torch.device, mixed_precision: str, inputs: torch.Tensor,
                   labels: torch.Tensor):
    """(r): one step of the loop a user writes with torch alone, on a model and optimizer of its own."""
    torch.manual_seed(cfg.seed)
    model = AlexNet(width=cfg.model_width, dropout=cfg.dropout).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    fused = device.type in _get_fused_kernels_supported_devices()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused, foreach=None if fused else True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(inputs), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_interleaved(measurements: dict, before_torchvision_window, device: torch.device, batch_size: int,
                     steps: int, windows: int, warmup: int) -> tuple[dict, dict]:
    """images/s of each measurement in each window (every measurement runs one window per round, so load from
    elsewhere falls on all of them alike), and the most memory each allocated (CUDA)."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for step in measurements.values():
        for _ in range(warmup):
            step()
    sync()
    rates = {name: [] for name in measurements}
    peak_bytes = {name: 0 for name in measurements}
    for _ in range(windows):
        for name, step in measurements.items():
            if name.startswith("torchvision"):
                before_torchvision_window()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            rates[name].append(steps * batch_size / (time.perf_counter() - start))
            if cuda:
                peak_bytes[name] = max(peak_bytes[name], torch.cuda.max_memory_allocated(device))
    return rates, peak_bytes


def benchmark_results(cfg: TrainConfig, accelerator, rates: dict, peak_bytes: dict, host_syncs: int | None,
                      timing: dict, peak: float | None) -> dict:
    """The benchmark's JSON object: the medians, their ratios, FLOPs and MFU."""
    dev = accelerator.device
    cuda = dev.type == "cuda"
    speed = {name: statistics.median(values) for name, values in rates.items()}
    counted = training_flops(cfg.model_width, cfg.image_size)
    flops = counted["training"]
    peak_source = "--peak-tflops"
    if peak is None:
        peak, peak_source = peak_tflops(dev, accelerator.mixed_precision)
    pipeline_cores = {"device": 1 if cuda else torch.get_num_threads(), "torchvision": max(1, cfg.num_workers)}
    pipeline_speedup = speed["device_pipeline"] / speed["torchvision_pipeline"]
    return {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch_version": torch.__version__,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "mixed_precision": accelerator.mixed_precision,
        "compile": cfg.compile,
        "augment": cfg.augment,
        "model_width": cfg.model_width,
        **timing,  # steps, windows, warmup
        "cpu_threads": torch.get_num_threads(),
        "torchvision_workers": cfg.num_workers,
        "model_images_per_sec": speed["model"],
        "trainer_images_per_sec": speed["trainer"],
        "torchvision_trainer_images_per_sec": speed["torchvision_trainer"],
        "device_pipeline_images_per_sec": speed["device_pipeline"],
        "torchvision_pipeline_images_per_sec": speed["torchvision_pipeline"],
        "reference_images_per_sec": speed["reference"],
        "optimizer_implementation": optimizer_implementation(cfg, dev),
        "trainer_over_reference": speed["trainer"] / speed["reference"],
        "model_over_reference": speed["model"] / speed["reference"],
        "trainer_over_model": speed["trainer"] / speed["model"],
        "torchvision_trainer_over_model": speed["torchvision_trainer"] / speed["model"],
        "pipeline_speedup": pipeline_speedup,
        # each pipeline's rate per CPU core it used: torch's threads (device pipeline on a CPU) or the
        # main thread (on a GPU), against the torchvision workers
        "pipeline_speedup_per_core": pipeline_speedup * pipeline_cores["torchvision"] / pipeline_cores["device"],
        "pipeline_cores": pipeline_cores,
        "forward_flops_per_image": counted["forward"],
        "train_flops_per_image": flops,
        "trainer_tflops": speed["trainer"] * flops / 1e12,
        "model_tflops": speed["model"] * flops / 1e12,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": speed["trainer"] * flops / 1e12 / peak if peak else None,
        "model_mfu": speed["model"] * flops / 1e12 / peak if peak else None,
        # the most memory allocated during a step, in GiB: weights, gradients and Adam state included
        "peak_memory_gib": {name: peak_bytes[name] / 2**30
                            for name in ("reference", "model", "trainer", "torchvision_trainer")}
        if cuda else None,
        "host_syncs_per_trainer_step": host_syncs / timing["steps"] if host_syncs is not None else None,
        "windows_images_per_sec": rates,
    }


def count_host_syncs(step, steps: int) -> int:
    """How many times `steps` calls of `step` made the host wait for the GPU (CUDA's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def format_table(r: dict) -> str:
    """The benchmark's result as the table it prints."""
    threads = f"{r['cpu_threads']} CPU threads"
    lines = [
        f"dist-alexnet benchmark | {r['device_name']} ({threads}), torch {r['torch_version']} | image {r['image_size']}, "
        f"batch {r['batch_size']}, mixed precision {r['mixed_precision']}, compile {'on' if r['compile'] else 'off'}, "
        f"augment {'on' if r['augment'] else 'off'}, model width {r['model_width']} | median of {r['windows']} "
        f"windows x {r['steps']} steps after {r['warmup']} warm-up steps",
        f"{'measurement':<55}{'images/s':>12}{'/ (r)':>8}{'peak GiB':>10}",
    ]
    memory = r["peak_memory_gib"] or {}
    for key, label in KINDS.items():
        rate = r[f"{key}_images_per_sec"]
        ratio = f"{rate / r['reference_images_per_sec']:.3f}" if key.endswith(("model", "trainer", "reference")) \
            else ""
        gib = f"{memory[key]:.2f}" if key in memory else ""
        lines.append(f"{label:<55}{rate:>12,.1f}{ratio:>8}{gib:>10}")
    cores = r["pipeline_cores"]
    lines.append(f"trainer_over_reference (b/r) {r['trainer_over_reference']:.3f} | optimizer "
                 f"{r['optimizer_implementation']} | trainer_over_model (b/a) {r['trainer_over_model']:.3f} | torchvision_trainer_over_model (c/a) "
                 f"{r['torchvision_trainer_over_model']:.3f} | pipeline_speedup (d device / d torchvision) "
                 f"{r['pipeline_speedup']:.2f}x, per CPU core {r['pipeline_speedup_per_core']:.2f}x "
                 f"({cores['device']} vs {cores['torchvision']})")
    mfu = (f"MFU {r['mfu']:.1%} (model alone {r['model_mfu']:.1%}) of {r['peak_tflops']:g} TFLOP/s "
           f"({r['peak_source']})" if r["mfu"] is not None else f"MFU n/a ({r['peak_source']})")
    lines.append(f"training FLOPs per image {r['train_flops_per_image'] / 1e9:.3f} G (forward "
                 f"{r['forward_flops_per_image'] / 1e9:.4f} G; FlopCounterMode) | trainer {r['trainer_tflops']:.3f} "
                 f"TFLOP/s | {mfu}")
    if r["host_syncs_per_trainer_step"] is not None:
        lines.append(f"host-device syncs per trainer step: {r['host_syncs_per_trainer_step']:g}")
    return "\n".join(lines)


def scaling_problems(args) -> list[str]:
    """What is wrong with the options of the multi-process benchmark."""
    problems = []
    if args.processes < 1:
        problems.append(f"--processes must be >= 1 (got {args.processes})")
    if args.threads_per_process is not None and args.threads_per_process < 1:
        problems.append(f"--threads-per-process must be >= 1 (got {args.threads_per_process})")
    problems += [f"--ddp-bucket-mb must be >= 1 (got {mb})" for mb in args.ddp_bucket_mb if mb < 1]
    if args.global_batch_size is not None and (args.global_batch_size < 1 or args.global_batch_size % args.processes):
        problems.append(f"--global-batch-size {args.global_batch_size} must be a positive multiple of --processes "
                        f"{args.processes}")
    if args.processes == 1 and (args.global_batch_size or args.parallelism != ["ddp"] or args.tensor_parallel_size):
        problems.append("--global-batch-size, --parallelism and --tensor-parallel-size are for --processes N > 1")
    tp = args.tensor_parallel_size or args.processes
    if "hybrid" in args.parallelism and (tp < 1 or args.processes % tp):
        problems.append(f"--tensor-parallel-size {tp} must divide --processes {args.processes}")
    if args.processes > 1 and args.device != "cpu" and use_cuda() \
            and torch.cuda.device_count() < args.processes:
        problems.append(f"--processes {args.processes}: only {torch.cuda.device_count()} GPUs here (--device cpu "
                        f"runs them on the CPU)")
    return problems


def main(args) -> int:
    """The `dist-alexnet benchmark` subcommand (flags in cli.py)."""
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # Accelerate (and the fp16 check) then use the CPU even with a GPU
    problems = []
    if args.device == "cuda" and not use_cuda():
        problems.append("--device cuda: no usable CUDA GPU here; use --device cpu or auto")
    problems += [f"--{name} must be >= {low} (got {getattr(args, name)})"
                for name, low in (("steps", 1), ("windows", 1), ("warmup", 0)) if getattr(args, name) < low]
    if args.peak_tflops is not None and not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        problems.append(f"--peak-tflops must be a positive number (got {args.peak_tflops})")
    problems += scaling_problems(args)
    try:
        cfg = config_from_args(args, only=options_for("benchmark"))
        check_output_file(args.json)
    except ConfigError as err:
        problems += str(err).splitlines()
    if problems:
        raise ConfigError("\n".join(problems))
    if args.processes > 1:
        result = run_scaling(args, cfg)
        print(format_scaling(result), flush=True)
    else:
        result = run_benchmark(cfg, steps=args.steps, windows=args.windows, warmup=args.warmup, peak=args.peak_tflops)
        print(format_table(result), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
