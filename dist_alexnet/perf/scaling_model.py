"""The scaling model: how long a data-parallel training step takes on n GPUs, from one GPU's step and the links.

One process's step is forward, backward, optimizer. Under DDP the gradient is all-reduced in buckets of about
--ddp-bucket-mb, filled in backward order: AlexNet's classifier gradients (94% of the bytes) are ready first,
its first convolution's last. A bucket's all-reduce starts when its last gradient is ready and the previous
bucket's all-reduce is done (one communication stream), and takes

    ring all-reduce time = 2 (n - 1) / n x bytes / bandwidth  (+ a fixed latency per call)

The part of the communication that ends after backward's last gradient is exposed: it adds to the step; the
rest is hidden behind backward. Weak-scaling efficiency = one process's step / the n-process step (the same
batch per process). What the model leaves out: the compute a concurrent all-reduce takes from backward (NCCL's
kernels use some SMs; on a CPU gloo's threads use the cores that compute, see `overlap=False`), stragglers,
and the per-step stop check (one tiny all-gather).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_alexnet.config import TrainConfig, check_output_file, config_from_args, options_for
from dist_alexnet.device import default_device
from dist_alexnet.errors import ConfigError
from dist_alexnet.model import AlexNet, build_model
from dist_alexnet.optimization import make_optimizer
from dist_alexnet.parallel import PLANNED, SHARDED
from dist_alexnet.perf.measure import ProfiledStep, StepProfile, backward_flops_by_layer, parameter_sizes
from dist_alexnet.rundir import write_atomically

MB = 2**20  # DDP's bucket_cap_mb counts MiB
FIRST_BUCKET_BYTES = 1 * MB  # torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES: DDP's first bucket is small

# Link bandwidths per GPU for the all-reduce ("bus bandwidth", as nccl-tests reports it) and a fixed latency per
# all-reduce call. Assumptions, with their sources:
# - NVLink 4 in an 8-GPU H100/H200 node: 900 GB/s per GPU both directions together (NVIDIA's H100/H200 data
#   sheets), 450 GB/s each way; NCCL's ring all-reduce reaches about 80% of it (nccl-tests all_reduce_perf
#   bus bandwidth on HGX H100 systems is typically reported at 350-370 GB/s without NVLink SHARP): 360 GB/s.
# - Between nodes, InfiniBand NDR, one 400 Gb/s ConnectX-7 per GPU (DGX H100/H200): 50 GB/s per GPU line rate,
#   about 90% of it reached by NCCL's inter-node all-reduce: 45 GB/s. With a NIC per GPU, the 8 rings of a node
#   run side by side, so the inter-node link bounds the per-GPU bus bandwidth.
# - Latency: about 20 us per all-reduce call in a node and 50 us across nodes (small-message all_reduce_perf
#   times are of this order); it matters only for many small buckets.
GPU_LINKS = {
    "nvlink": dict(bandwidth=360e9, latency=20e-6,
                   source="NVLink 4, 450 GB/s each way per GPU (H100/H200 data sheets), ~80% reached by NCCL"),
    "infiniband": dict(bandwidth=45e9, latency=50e-6,
                       source="InfiniBand NDR 400 Gb/s per GPU (DGX H100/H200), ~90% reached by NCCL"),
}
GPUS_PER_NODE = 8
# One H200's step, assumed until measured (`dist-alexnet scaling-model --measure` on a GPU machine): the
# project's target of 40,000 images/s at batch 512 and 224 px, i.e. 12.8 ms, of which Adam over 58.3M parameters
# (about 1.9 GB of memory traffic at ~4 TB/s) takes 0.5 ms; forward and backward share the rest 1:2.
ASSUMED_GPU_STEP = dict(step_s=512 / 40_000, optimizer_s=0.5e-3, batch_size=512)


def ring_allreduce_seconds(nbytes: float, n: int, bandwidth: float, latency: float = 0.0) -> float:
    """The textbook ring all-reduce time of `nbytes` over n processes: 2(n-1)/n x nbytes / bandwidth, plus a
    fixed latency per call. Zero for one process."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + latency


@dataclass
class Link:
    """How fast gradients move between the processes: bus bandwidth (bytes/s) and latency per all-reduce."""
    bandwidth: float
    latency: float
    source: str

    def allreduce_seconds(self, nbytes: float, n: int) -> float:
        return ring_allreduce_seconds(nbytes, n, self.bandwidth, self.latency)


def gpu_link(gpus: int, links: dict = GPU_LINKS) -> Link:
    """The link that bounds an all-reduce over `gpus` GPUs in nodes of 8: NVLink inside one node, else the
    InfiniBand NIC of each GPU."""
    return Link(**links["nvlink" if gpus <= GPUS_PER_NODE else "infiniband"])


def gradient_buckets(sizes: list[tuple[str, int]], bucket_mb: float, bytes_per_element: int = 4) -> list[list[str]]:
    """DDP's buckets, in the order their all-reduces start: parameters in reverse model order (the order backward
    produces their gradients), each bucket closed once it holds at least its cap, the first one capped at 1 MiB
    and the others at `bucket_mb` MiB (a parameter is never split, so one bigger than the cap has a bucket of
    its own)."""
    buckets, current, filled = [], [], 0
    for name, numel in reversed(sizes):
        current.append(name)
        filled += numel * bytes_per_element
        if filled >= (FIRST_BUCKET_BYTES if not buckets else bucket_mb * MB):
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


def layer_flops_profile(model_width: float, image_size: int, step_s: float, optimizer_s: float, batch_size: int,
                        source: str) -> StepProfile:
    """A profile from a step time alone: forward and backward (1:2) spread over the convolutions and linear
    layers in proportion to their backward FLOPs (FlopCounterMode's, as the benchmark counts them), backward
    running from the last layer to the first. For a device we cannot measure here."""
    with torch.device("meta"):  # shapes only, nothing computed
        model = AlexNet(width=model_width)
    backward_work = backward_flops_by_layer(model_width, image_size)
    layers = [(name, model.get_submodule(name)) for name in backward_work]
    compute_s = step_s - optimizer_s
    forward_s, backward_s = compute_s / 3, compute_s * 2 / 3
    total, done, ready = sum(backward_work.values()), 0.0, {}
    for name, module in reversed(layers):
        done += backward_work[name]
        for param_name, _ in module.named_parameters():
            ready[f"{name}.{param_name}"] = backward_s * done / total
    return StepProfile(forward_s, backward_s, optimizer_s, ready, batch_size, source, parameter_sizes(model))


def predict_step(profile: StepProfile, n: int, link: Link, bucket_mb: float = 25,
                 wire_bytes_per_element: int = 4, overlap: bool = True) -> dict:
    """The n-process step the model predicts: each bucket's all-reduce in backward order, hidden behind backward
    where it can be (`overlap`; without it, as on a CPU whose every core computes, communication adds in full).
    `wire_bytes_per_element` is 2 for a bf16 or fp16 communication hook (the buckets keep their fp32 sizes)."""
    numel = dict(profile.sizes)
    free_at, comm_s, buckets = 0.0, 0.0, []
    for names in gradient_buckets(profile.sizes, bucket_mb):
        nbytes = sum(numel[name] for name in names) * wire_bytes_per_element
        seconds = link.allreduce_seconds(nbytes, n)
        start = max(free_at, max(profile.ready_s[name] for name in names)) if overlap else free_at
        free_at = start + seconds
        comm_s += seconds
        buckets.append({"params": names, "wire_bytes": nbytes, "allreduce_s": seconds})
    exposed_s = max(0.0, free_at - profile.backward_s) if overlap else comm_s
    step_s = profile.step_s + exposed_s
    sent = sum(2 * (n - 1) / n * b["wire_bytes"] for b in buckets) if n > 1 else 0.0
    return predicted_step(profile, n, step_s, profile.step_s, comm_s, exposed_s, comm_s - exposed_s, sent, buckets)


def predicted_step(profile: StepProfile, n: int, step_s: float, compute_s: float, allreduce_s: float,
                   exposed_s: float, hidden_s: float, sent: float, buckets: list, **mode) -> dict:
    """One predicted n-process step as every predict_*_step returns it; `mode`: the mode's own fields (its group
    size, hybrid's tensor-parallel seconds)."""
    return {
        "processes": n,
        **mode,
        "step_s": step_s,
        "compute_s": compute_s,
        "allreduce_s": allreduce_s,
        "exposed_s": exposed_s,
        "hidden_s": hidden_s,
        "efficiency": profile.step_s / step_s,
        "images_per_sec": n * profile.batch_size / step_s,
        "bytes_sent_per_step": sent,
        "buckets": buckets,
    }


def ring_gather_seconds(nbytes: float, n: int, link: Link) -> float:
    """A ring all-gather (of `nbytes` in all, out of every rank's share) or reduce-scatter (of `nbytes` in all,
    into every rank's share): (n-1)/n x nbytes / bandwidth + latency; half an all-reduce. Zero for one rank."""
    return (n - 1) / n * nbytes / link.bandwidth + link.latency if n > 1 else 0.0


def predict_hybrid_step(profile: StepProfile, n: int, tensor_parallel: int, tp_link: Link, dp_link: Link,
                        world_link: Link, bucket_mb: float = 25, wire_bytes_per_element: int = 4,
                        activation_bytes: int = 4, overlap: bool = True) -> dict:
    """The n-process step under --parallelism hybrid (parallel.py), from one process's profile at the same batch
    per process:
    - compute: unchanged (each rank computes 1/T of the classifier for T x the examples: the same FLOPs);
    - the optimizer: in proportion to the parameters a rank holds (1/T of fc1 and fc2);
    - the classifier's exchange in the tensor-parallel group (`tp_link`), blocking, forward and backward alike:
      an all-gather of the group's features (T x B x 9216 activations) and a reduce-scatter of fc2's partial
      sums (T x B x 4096), each `activation_bytes` per value;
    - the plan's gradient all-reduce (the shards and fc2's bias) across the n / T groups (`dp_link`), started
      when backward has finished the classifier, then DDP's buckets of the replicated parameters over all n
      ranks (`world_link`), on one stream as in predict_step; what ends after backward is exposed (all of it
      without `overlap`)."""
    numel = dict(profile.sizes)
    groups = n // tensor_parallel
    hidden, features = numel["classifier.1.bias"], numel["classifier.1.weight"] // numel["classifier.1.bias"]
    sharded = sum(numel[name] for name in SHARDED)
    exchange = tensor_parallel * profile.batch_size * activation_bytes
    gather_s = ring_gather_seconds(exchange * features, tensor_parallel, tp_link)
    scatter_s = ring_gather_seconds(exchange * hidden, tensor_parallel, tp_link)
    tp_s = 2 * (gather_s + scatter_s)  # forward and backward
    optimizer_s = profile.optimizer_s * (sum(numel.values()) - sharded * (1 - 1 / tensor_parallel)) / sum(numel.values())
    backward_end = profile.backward_s + tp_s / 2
    # one all-reduce stream: first the shards (when fc1's gradient is ready), then DDP's buckets
    shard_bytes = sum(numel[name] / (tensor_parallel if name in SHARDED else 1) for name in PLANNED) * 4
    shard_s = dp_link.allreduce_seconds(shard_bytes, groups) if groups > 1 else 0.0
    start = profile.ready_s["classifier.1.weight"] + tp_s / 4 if overlap else 0.0
    free_at, comm_s, sent, buckets = start + shard_s, shard_s, 2 * (groups - 1) / groups * shard_bytes, []
    replicated = [(name, size) for name, size in profile.sizes if name not in PLANNED]
    for names in gradient_buckets(replicated, bucket_mb):
        nbytes = sum(numel[name] for name in names) * wire_bytes_per_element
        seconds = world_link.allreduce_seconds(nbytes, n)
        ready = max(profile.ready_s[name] for name in names) + tp_s / 2
        free_at = (max(free_at, ready) if overlap else free_at) + seconds
        comm_s += seconds
        sent += 2 * (n - 1) / n * nbytes
        buckets.append({"params": names, "wire_bytes": nbytes, "allreduce_s": seconds})
    sent += 2 * (tensor_parallel - 1) / tensor_parallel * exchange * (features + hidden)
    exposed_s = max(0.0, free_at - backward_end) if overlap else comm_s
    compute_s = profile.forward_s + profile.backward_s + optimizer_s
    step_s = compute_s + tp_s + exposed_s
    return predicted_step(profile, n, step_s, compute_s, comm_s, exposed_s + tp_s, comm_s - exposed_s, sent, buckets,
                          tensor_parallel_size=tensor_parallel, tensor_parallel_s=tp_s)


def predict_fsdp_step(profile: StepProfile, n: int, shard: int, shard_link: Link, across_link: Link,
                      overlap: bool = True) -> dict:
    """The n-process step under --parallelism fsdp, every parameter sharded over `shard` ranks (a node) and
    replicated across the n / shard groups:
    - the optimizer steps 1/shard of the parameters;
    - in the group (`shard_link`): every weight all-gathered for forward, fc1's and fc2's again for backward (the
      root unit stays whole between the two), every gradient reduce-scattered: fp32, ring algorithms;
    - across the groups (`across_link`): the gradient shards all-reduced;
    - with `overlap` (GPUs: FSDP2 prefetches the next unit's all-gather and reduce-scatters behind backward) the
      root unit's all-gather (before anything computes) and reduce-scatter (after backward's last gradient) are
      exposed, and of the rest what exceeds forward and backward; without it (a CPU whose every core computes)
      all of it."""
    numel = dict(profile.sizes)
    weights = sum(numel.values()) * 4
    gathered_again = sum(size for name, size in numel.items() if name.startswith(("classifier.1.", "classifier.4.")))
    gather_bytes = weights + gathered_again * 4
    groups = n // shard
    in_group_s = ring_gather_seconds(gather_bytes, shard, shard_link) + ring_gather_seconds(weights, shard, shard_link)
    across_s = across_link.allreduce_seconds(weights / shard, groups) if groups > 1 else 0.0
    comm_s = in_group_s + across_s
    compute_s = profile.forward_s + profile.backward_s + profile.optimizer_s / shard
    root_s = 2 * ring_gather_seconds(weights - gathered_again * 4, shard, shard_link)
    exposed_s = root_s + max(0.0, comm_s - root_s - profile.forward_s - profile.backward_s) if overlap else comm_s
    step_s = compute_s + exposed_s
    sent = (shard - 1) / shard * (gather_bytes + weights) + (2 * (groups - 1) / groups * weights / shard
                                                             if groups > 1 else 0.0)
    return predicted_step(profile, n, step_s, compute_s, comm_s, exposed_s, comm_s - exposed_s, sent, [],
                          shard_size=shard)


def predict(profile: StepProfile, parallelism: str, n: int, batch_size: int, tp_link: Link, dp_link: Link,
            world_link: Link, bucket_mb: float = 25, wire_bytes_per_element: int = 4, activation_bytes: int = 4,
            tensor_parallel: int = 1, overlap: bool = True) -> dict:
    """predict_step (ddp), predict_hybrid_step or predict_fsdp_step at `batch_size` per process;
    `tensor_parallel`: hybrid's tensor-parallel group or fsdp's shard group (tp_link inside it, dp_link across)."""
    at_batch = profile.with_batch_size(batch_size)
    if parallelism == "ddp":
        return predict_step(at_batch, n, world_link, bucket_mb, wire_bytes_per_element, overlap)
    if parallelism == "fsdp":
        return predict_fsdp_step(at_batch, n, tensor_parallel, tp_link, dp_link, overlap)
    return predict_hybrid_step(at_batch, n, tensor_parallel, tp_link, dp_link, world_link, bucket_mb,
                               wire_bytes_per_element, activation_bytes, overlap)


# The scenarios of the GPU table: what a user can change. Hybrid runs in bf16 (its exchanged activations are
# bf16, 2 bytes), its replicated gradients all-reduced in fp32, the classifier split over the GPUs of a node.
SCENARIOS = {
    "fp32 all-reduce, batch 512": dict(parallelism="ddp", wire_bytes_per_element=4, batch_size=512, bucket_mb=25),
    "bf16 hook, batch 512": dict(parallelism="ddp", wire_bytes_per_element=2, batch_size=512, bucket_mb=25),
    "fp32, batch 1024": dict(parallelism="ddp", wire_bytes_per_element=4, batch_size=1024, bucket_mb=25),
    "bf16 hook, 5 MB buckets": dict(parallelism="ddp", wire_bytes_per_element=2, batch_size=512, bucket_mb=5),
    "fp32, 100 MB buckets": dict(parallelism="ddp", wire_bytes_per_element=4, batch_size=512, bucket_mb=100),
    "hybrid, batch 512": dict(parallelism="hybrid", wire_bytes_per_element=4, batch_size=512, bucket_mb=25),
    "fsdp, batch 512": dict(parallelism="fsdp", wire_bytes_per_element=4, batch_size=512, bucket_mb=25),
}
# The modes compared at a fixed global batch (strong scaling) and the global batches of that table.
MODES = {"ddp fp32": dict(parallelism="ddp", wire_bytes_per_element=4),
         "ddp bf16 hook": dict(parallelism="ddp", wire_bytes_per_element=2),
         "hybrid": dict(parallelism="hybrid", wire_bytes_per_element=4),
         "fsdp": dict(parallelism="fsdp", wire_bytes_per_element=4)}
GLOBAL_BATCHES = (1024, 4096, 16384)
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # up to 64 nodes of 8


def predict_on_gpus(profile: StepProfile, gpus: int, batch_size: int, parallelism: str,
                    wire_bytes_per_element: int, bucket_mb: float = 25, links: dict = GPU_LINKS) -> dict:
    """One mode's step on `gpus` GPUs in nodes of 8 at `batch_size` per GPU: ddp's all-reduce over the link that
    bounds it (gpu_link); hybrid's classifier (fsdp's every parameter) split over the GPUs of a node (NVLink),
    its shards all-reduced across nodes (InfiniBand)."""
    tensor_parallel = min(gpus, GPUS_PER_NODE)
    return predict(profile, parallelism, gpus, batch_size, Link(**links["nvlink"]), Link(**links["infiniband"]),
                   gpu_link(gpus, links), bucket_mb, wire_bytes_per_element, activation_bytes=2,
                   tensor_parallel=tensor_parallel)


def gpu_table(profile: StepProfile, links: dict = GPU_LINKS) -> dict:
    """The predicted weak-scaling efficiency and step time for each scenario at each GPU count, and the strong
    scaling (a fixed global batch, GLOBAL_BATCHES) of each mode, with the fastest mode at each point."""
    rows = []
    for gpus in GPU_COUNTS:
        row = {"gpus": gpus, "nodes": max(1, gpus // GPUS_PER_NODE)}
        for label, s in SCENARIOS.items():
            p = predict_on_gpus(profile, gpus, s["batch_size"], s["parallelism"], s["wire_bytes_per_element"],
                                s["bucket_mb"], links)
            row[label] = {"efficiency": p["efficiency"], "step_ms": p["step_s"] * 1e3,
                          "exposed_ms": p["exposed_s"] * 1e3}
        rows.append(row)
    return {"profile": profile.to_dict(), "links": links, "scenarios": SCENARIOS, "rows": rows,
            "strong": strong_table(profile, links)}


def strong_table(profile: StepProfile, links: dict = GPU_LINKS) -> list[dict]:
    """At each global batch G and GPU count n (G / n >= 1 per GPU): each mode's step at G / n per GPU, its
    strong-scaling efficiency (one GPU's step at G over n x the n-GPU step) and the fastest mode. The profile
    scales linearly with the batch: at a few images per GPU a real GPU is slower than that (not compute bound),
    so small-batch efficiencies are upper bounds."""
    rows = []
    for global_batch in GLOBAL_BATCHES:
        one = profile.with_batch_size(global_batch).step_s
        for gpus in GPU_COUNTS[1:]:
            if global_batch < gpus:
                continue
            row = {"global_batch": global_batch, "gpus": gpus, "nodes": max(1, gpus // GPUS_PER_NODE)}
            for mode, m in MODES.items():
                step = predict_on_gpus(profile, gpus, global_batch / gpus, m["parallelism"],
                                       m["wire_bytes_per_element"], links=links)["step_s"]
                row[mode] = {"step_ms": step * 1e3, "efficiency": one / (gpus * step)}
            row["fastest"] = min(MODES, key=lambda mode: row[mode]["step_ms"])
            rows.append(row)
    return rows


def format_gpu_table(table: dict) -> str:
    profile = table["profile"]
    step_ms = (profile["forward_s"] + profile["backward_s"] + profile["optimizer_s"]) * 1e3
    labels = list(table["scenarios"])
    lines = [f"predicted weak-scaling efficiency (step ms) | one process: {step_ms:.1f} ms at batch "
             f"{profile['batch_size']} ({profile['source']})",
             f"{'GPUs':>5} {'nodes':>5}  " + "  ".join(f"{label:>22}" for label in labels)]
    for row in table["rows"]:
        cells = [f"{row[label]['efficiency']:>13.1%} ({row[label]['step_ms']:5.1f})" for label in labels]
        lines.append(f"{row['gpus']:>5} {row['nodes']:>5}  " + "  ".join(f"{cell:>22}" for cell in cells))
    lines.append("strong scaling, a fixed global batch: efficiency (step ms) of " + ", ".join(MODES)
                 + ", and the fastest")
    for row in table["strong"]:
        cells = "  ".join(f"{row[mode]['efficiency']:>7.1%} ({row[mode]['step_ms']:6.2f})" for mode in MODES)
        lines.append(f"  global batch {row['global_batch']:>6}, {row['gpus']:>3} GPUs ({row['nodes']:>2} nodes): "
                     f"{cells}  fastest: {row['fastest']}")
    lines.append("links: " + "; ".join(f"{name} {link['bandwidth'] / 1e9:g} GB/s + {link['latency'] * 1e6:g} us per "
                                       f"call ({link['source']})" for name, link in table["links"].items()))
    return "\n".join(lines)


def under(table: dict, label: str, threshold: float = 0.9) -> int | None:
    """The fewest GPUs at which a scenario's predicted efficiency falls under `threshold`."""
    return next((row["gpus"] for row in table["rows"] if row[label]["efficiency"] < threshold), None)


def fit_link(sizes_bytes: list[float], seconds: list[float], n: int, source: str) -> Link:
    """The Link whose ring all-reduce time fits measured all-reduce times best (least squares of t = a + b x
    bytes; bandwidth = 2(n-1)/n / b, latency = a)."""
    count = len(sizes_bytes)
    mean_x, mean_y = sum(sizes_bytes) / count, sum(seconds) / count
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes_bytes, seconds))
             / sum((x - mean_x) ** 2 for x in sizes_bytes))
    intercept = mean_y - slope * mean_x
    bandwidth = 2 * (n - 1) / n / slope if slope > 0 else math.inf
    return Link(bandwidth=bandwidth, latency=max(0.0, intercept), source=source)


def load_profile(path: str) -> StepProfile:
    """The step profile in a JSON file: a `benchmark --processes N` result (its first variant's), a
    `scaling-model --json` table, or a bare profile."""
    try:
        data = json.loads(open(path).read())
        data = data["variants"][0] if "variants" in data else data
        return StepProfile.from_dict(data.get("profile", data))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--profile {path}: not a step profile ({type(err).__name__}: {err})") from None


def measured_profile(batch_size: int, image_size: int, mixed_precision: str, model_width: float = 1.0) -> StepProfile:
    """One process's step profile, measured here (CUDA when available)."""
    device = default_device()
    cfg = TrainConfig(batch_size=batch_size, image_size=image_size, model_width=model_width)
    model = build_model(cfg, device)
    optimizer = make_optimizer(cfg, model, cfg.lr)
    inputs = torch.randn(batch_size, 1, image_size, image_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mixed_precision == "bf16"
                else contextlib.nullcontext)
    step = ProfiledStep(model, optimizer, inputs, labels, device, autocast)
    for _ in range(3):  # warm-up: cuDNN's autotuning, the optimizer's state
        step()
    step.recording = True
    for _ in range(10):
        step()
    return step.profile()


def main(args) -> int:
    """The `dist-alexnet scaling-model` subcommand (flags in cli.py)."""
    if args.profile and args.measure:
        raise ConfigError("--profile and --measure: give one of them")
    cfg = config_from_args(args, only=options_for("scaling-model"))  # the step: train's checks of its options
    check_output_file(args.json)
    if args.measure:
        profile = measured_profile(cfg.batch_size, cfg.image_size, cfg.mixed_precision, cfg.model_width)
    elif args.profile:
        profile = load_profile(args.profile)
    else:
        profile = layer_flops_profile(1.0, cfg.image_size, **ASSUMED_GPU_STEP,
                                      source="assumed H200 step, 40,000 images/s, not measured")
    links = {name: dict(link) for name, link in GPU_LINKS.items()}
    for name, flag in (("nvlink", args.intra_node_gbs), ("infiniband", args.inter_node_gbs)):
        if flag is not None:
            if not (flag > 0 and math.isfinite(flag)):
                raise ConfigError(f"--{'intra' if name == 'nvlink' else 'inter'}-node-gbs must be a positive "
                                  f"number (got {flag})")
            links[name].update(bandwidth=flag * 1e9, source="given on the command line")
    table = gpu_table(profile, links)
    print(format_gpu_table(table))
    for label in SCENARIOS:
        gpus = under(table, label)
        print(f"{label}: efficiency under 90% from {gpus} GPUs" if gpus else f"{label}: 90% or more up to "
              f"{GPU_COUNTS[-1]} GPUs")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(args.json), json.dumps(table, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
