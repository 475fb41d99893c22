"""`dist-alexnet benchmark --processes N`: the trainer's step on 1 and on N processes, side by side, and where
the difference goes.

The command starts N processes with torch's launcher (torchrun --standalone) once per variant (each
--ddp-comm-hook x --ddp-bucket-mb). In every process: the trainer's model, optimizer and Accelerator (the same
functions as `train`), a batch made once on the device, the same batch size per process. Every --windows
round times, one after the other, so that load from elsewhere falls on all alike:

  solo     rank 0 alone, a copy of the model outside DDP, while the other ranks wait in a collective: 1 process
  no_sync  all N ranks, DDP's no_sync(): the same compute, no gradient all-reduce (what sharing the machine costs)
  ddp      all N ranks, the trainer's own step (steps.TrainStep: DDP all-reduce, the per-step stop check)

A DDP communication hook (torch's allreduce or bf16/fp16 compression hook, wrapped) records when each bucket's
all-reduce starts and ends. From that, per step: the all-reduce time (the time some bucket is in flight), the
exposed part (from the last bucket's start, when backward has produced its last gradient, to the end of the
last all-reduce) and the hidden part (the rest). The hook's clock is the host's: on CUDA the figures would be
launch times, not kernel times, so there they are left out (null) and only the images/s are measured.

Then rank 0 measures one process's step profile (forward, backward with each gradient's ready time,
optimizer), and all ranks time plain all-reduces of 1-64 MiB, which give the link (bandwidth, latency) that the
scaling model (scaling_model.py) uses to predict the ddp step; the prediction and its error are reported.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dist_alexnet.config import TrainConfig, resolve_mixed_precision
from dist_alexnet.device import use_cuda
from dist_alexnet.distributed import make_accelerator
from dist_alexnet.errors import ConfigError
from dist_alexnet.model import build_model
from dist_alexnet.optimization import make_optimizer
from dist_alexnet.parallel import Traffic, make_parallelism, state_bytes
from dist_alexnet.perf.measure import ProfiledStep
from dist_alexnet.perf.scaling_model import fit_link, gradient_buckets, predict
from dist_alexnet.stats import StepStats
from dist_alexnet.steps import TrainStep

ALLREDUCE_SIZES_MB = (1, 4, 16, 64)
RANK0_SUMMARY = "summary.json"


# ----------------------------------------------------------------------------- parent: launch and report

def run_scaling(args, cfg) -> dict:
    """Launch one N-process run per variant and gather rank 0's results."""
    variants = [(parallelism, hook, bucket) for parallelism in args.parallelism for hook in args.ddp_comm_hook
                for bucket in args.ddp_bucket_mb]
    threads = args.threads_per_process or max(1, (os.cpu_count() or 1) // args.processes)
    strong = args.global_batch_size is not None
    per_process = args.global_batch_size // args.processes if strong else cfg.batch_size
    results = {"processes": args.processes, "threads_per_process": threads, "image_size": cfg.image_size,
               "scaling": "strong" if strong else "weak", "global_batch_size": args.global_batch_size,
               "batch_size_per_process": per_process, "solo_batch_size": args.global_batch_size or cfg.batch_size,
               "model_width": cfg.model_width, "mixed_precision": resolve_mixed_precision(cfg), "steps": args.steps,
               "windows": args.windows, "warmup": args.warmup, "variants": []}
    for parallelism, hook, bucket in variants:
        print(f"measuring {args.processes} processes, --parallelism {parallelism}, --ddp-comm-hook {hook}, "
              f"--ddp-bucket-mb {bucket} ...", flush=True)
        results["variants"].append(launch_variant(args, cfg, parallelism, hook, bucket, threads, per_process,
                                                  results["solo_batch_size"]))
    return results


def launch_variant(args, cfg, parallelism: str, hook: str, bucket_mb: int, threads: int, batch_size: int,
                   solo_batch_size: int) -> dict:

    with tempfile.TemporaryDirectory(prefix="dist-alexnet-scaling-") as folder:
        out = Path(folder) / RANK0_SUMMARY
        tensor_parallel = ["--tensor-parallel-size", str(args.tensor_parallel_size)] if args.tensor_parallel_size \
            else []
        worker_args = ["--out", str(out), "--parallelism", parallelism, *tensor_parallel, "--hook", hook,
                       "--bucket-mb", str(bucket_mb), "--threads", str(threads),
                       "--image-size", str(cfg.image_size), "--batch-size", str(batch_size),
                       "--solo-batch-size", str(solo_batch_size),
                       "--model-width", str(cfg.model_width), "--mixed-precision", resolve_mixed_precision(cfg),
                       "--steps", str(args.steps), "--windows", str(args.windows), "--warmup", str(args.warmup),
                       "--seed", str(cfg.seed)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.processes), "-m", "dist_alexnet.perf.scaling_benchmark", *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if args.device == "cpu" or not use_cuda():
            env["ACCELERATE_USE_CPU"] = "1"
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise ConfigError(f"the {args.processes}-process benchmark failed (exit {proc.returncode}): "
                              f"{worker_error(proc.stderr + proc.stdout)}")
        return json.loads(out.read_text())


def worker_error(output: str) -> str:
    """The line of a failed run that names the error (a worker's last "...Error: ..." line), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(\[rank\d+\]: )?\w*(Error|Exception)\b", line)]
    exits = [line for line in lines if re.search(r"exitcode|Signal \d+|terminate called", line)]
    return (errors or exits or lines or ["no output"])[-1]


def format_scaling(r: dict) -> str:
    n = r["processes"]
    batch = (f"global batch {r['global_batch_size']} ({r['batch_size_per_process']} per process; 1 process at "
             f"{r['solo_batch_size']}): strong scaling" if r["scaling"] == "strong"
             else f"batch {r['batch_size_per_process']} per process: weak scaling")

    def cell(value, spec, scale=1.0, unit=""):
        return "n/a" if value is None else f"{value * scale:{spec}}{unit}"

    lines = [f"dist-alexnet benchmark --processes {n} | {r['threads_per_process']} torch thread(s) per process | image "
             f"{r['image_size']}, {batch}, model width {r['model_width']}, mixed precision {r['mixed_precision']} | "
             f"median of {r['windows']} windows x {r['steps']} steps",
             f"{'variant':<22}{'1 proc img/s':>13}{f'{n} proc img/s':>13}{'efficiency':>11}{'no_sync eff':>12}"
             f"{'MB sent':>9}{'collect.':>10}{'exposed':>9}{'state MB':>10}{'model':>8}{'error':>8}"]
    for v in r["variants"]:
        collective = v["collective_s"]
        in_collectives = None if collective["exposed"] is None else collective["exposed"] + collective["hidden"]
        lines.append(f"{v['parallelism'] + ', ' + v['ddp_comm_hook'] + ', ' + str(v['ddp_bucket_mb']) + ' MB':<22}"
                     f"{v['solo_images_per_sec']:>13,.1f}{v['images_per_sec']:>13,.1f}{v['efficiency']:>11.3f}"
                     f"{cell(v['no_sync_efficiency'], '.3f'):>12}"
                     f"{v['bytes_sent_per_step']['total'] / 1e6:>9.1f}"
                     f"{cell(in_collectives, '.0f', 1e3, ' ms'):>10}{cell(collective['exposed'], '.0f', 1e3, ' ms'):>9}"
                     f"{v['state_bytes_per_rank']['total'] / 1e6:>10.0f}"
                     f"{v['model']['efficiency']:>8.3f}{v['model']['step_error']:>+8.1%}")
    lines.append("efficiency: N-process images/s / (N x 1-process images/s); no_sync: the same without the gradient "
                 "all-reduce (ddp); MB sent: bytes one rank sends per step (ring all-reduce, all-gather, "
                 "reduce-scatter); collect.: time per step in collectives, exposed: the part the step waited for; "
                 "state MB: parameters + gradients + optimizer state per rank; model: the predicted efficiency and "
                 "the error of its step time")
    for v in r["variants"]:
        b = v["breakdown_ms"]
        name = f"{v['parallelism']}, {v['ddp_comm_hook']}, {v['ddp_bucket_mb']} MB"
        sent = ", ".join(f"{kind} {value / 1e6:.1f} MB" for kind, value in v["bytes_sent_per_step"].items()
                         if kind != "total")
        if b["sharing_the_machine"] is not None:
            communication = (f"{b['sharing_the_machine']:+.0f} ms sharing the machine (no_sync), "
                             + (f"{b['exposed_allreduce']:+.0f} ms exposed all-reduce, "
                                f"{b['compute_slowed_by_allreduce']:+.0f} ms compute slowed by the hidden all-reduce"
                                if b["exposed_allreduce"] is not None
                                else "+ the all-reduce (not split: the hook sees CUDA launches only)"))
        else:
            communication = "(no no_sync split: " + ("strong scaling" if r["scaling"] == "strong" else
                                                     "the classifier's collectives are part of the step") + ")"
        lines.append(f"{name}: step {v['step_s']['solo'] * 1e3:.0f} ms on 1 process -> "
                     f"{v['step_s'][v['parallelism']] * 1e3:.0f} ms on {n}: {communication} | sent per step: {sent} "
                     f"| link {v['link']['bandwidth'] / 1e9:.2f} GB/s + {v['link']['latency'] * 1e3:.2f} ms per call")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- worker: one of the N processes

class BucketTimer:
    """A DDP communication hook that runs `inner` (torch's allreduce or compression hook) and records each
    bucket's start and end time, its size and its parameters."""
    def __init__(self, inner, names_by_pointer: dict[int, str]):
        self.inner, self.names_by_pointer = inner, names_by_pointer
        self.recording, self.steps, self.buckets = False, [], {}
        self.lock = threading.Lock()

    def hook(self, state, bucket):
        start = time.perf_counter()
        future = self.inner(state, bucket)
        if not self.recording:
            return future
        # DDP rebuilds its buckets in the order gradients arrived after the first step: keep the latest layout
        self.buckets[bucket.index()] = {"numel": bucket.buffer().numel(),
                                        "params": [self.names_by_pointer[p.data_ptr()] for p in bucket.parameters()]}
        if bucket.index() == 0:
            self.steps.append([])
        record = self.steps[-1]

        def done(fut):
            with self.lock:
                record.append((start, time.perf_counter()))
            return fut.value()

        return future.then(done)

    def per_step(self) -> dict:
        """Medians over the recorded steps: time with some all-reduce in flight, and its exposed part."""
        busy, exposed = [], []
        for intervals in self.steps:
            intervals = sorted(intervals)
            total, end = 0.0, -1e30
            for s, e in intervals:
                total += max(0.0, e - max(s, end))
                end = max(end, e)
            busy.append(total)
            exposed.append(max(0.0, end - intervals[-1][0]))
        allreduce_s, exposed_s = statistics.median(busy), statistics.median(exposed)
        hidden = max(0.0, allreduce_s - exposed_s)
        return {"allreduce_s": allreduce_s, "exposed_s": exposed_s, "hidden_s": hidden,
                "overlap": hidden / allreduce_s if allreduce_s else 0.0}


def comm_hook(name: str):
    return {"none": default_hooks.allreduce_hook, "bf16": default_hooks.bf16_compress_hook,
            "fp16": default_hooks.fp16_compress_hook}[name]


def worker(opts: argparse.Namespace) -> None:

    torch.set_num_threads(opts.threads)
    cfg = TrainConfig(image_size=opts.image_size, batch_size=opts.batch_size, model_width=opts.model_width,
                      mixed_precision=opts.mixed_precision, ddp_bucket_mb=opts.bucket_mb, seed=opts.seed,
                      parallelism=opts.parallelism, tensor_parallel_size=opts.tensor_parallel_size).validate()
    accelerator = make_accelerator(cfg)  # comm hook "none" here: ours, timed, is registered below
    dev, rank, n = accelerator.device, accelerator.process_index, accelerator.num_processes
    parallel = make_parallelism(cfg, accelerator)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dev)
    solo_model = copy.deepcopy(model) if rank == 0 else None  # the whole model, outside DDP
    solo_optimizer = make_optimizer(cfg, solo_model, cfg.lr) if solo_model is not None else None
    model = parallel.split(model)
    optimizer = make_optimizer(cfg, model, cfg.lr)
    if parallel.uses_ddp:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # fsdp: sharded by parallel.split, not wrapped in DDP (as in train.set_up)
        model, optimizer = accelerator.prepare_model(model, evaluation_mode=True), accelerator.prepare(optimizer)
    names = {p.data_ptr(): name for name, p in accelerator.unwrap_model(model).named_parameters()}
    timer = BucketTimer(comm_hook(opts.hook), names)
    if parallel.uses_ddp:
        model.register_comm_hook(None, timer.hook)
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    inputs = torch.randn(cfg.batch_size, 1, cfg.image_size, cfg.image_size, generator=generator).to(dev)
    labels = torch.randint(0, 10, (cfg.batch_size,), generator=generator).to(dev)
    solo_inputs = torch.randn(opts.solo_batch_size, 1, cfg.image_size, cfg.image_size, generator=generator).to(dev)
    solo_labels = torch.randint(0, 10, (opts.solo_batch_size,), generator=generator).to(dev)
    train_step = TrainStep(model, optimizer, accelerator, parallel, StepStats(accelerator))

    solo_step = ProfiledStep(solo_model, solo_optimizer, solo_inputs, solo_labels, dev, accelerator.autocast) \
        if rank == 0 else None

    def solo():
        if solo_step is not None:
            solo_step()

    measurements = {"solo": solo}
    if opts.parallelism == "ddp":  # (under hybrid the classifier's collectives are part of the computation)
        no_sync_step = ProfiledStep(model, optimizer, inputs, labels, dev, accelerator.autocast, gradient_times=False)

        def no_sync():
            with model.no_sync():
                no_sync_step()
        measurements["no_sync"] = no_sync
    measurements[opts.parallelism] = lambda: train_step(inputs, labels)
    times = time_windows(measurements, {opts.parallelism: timer, "solo": solo_step}, accelerator, opts,
                         parallel.traffic)
    step_s = {name: statistics.median(values) for name, values in times.items()}
    communication = timer.per_step() if dev.type == "cpu" and parallel.uses_ddp else None
    traffic = traffic_per_step(parallel, accelerator, opts, timer, communication)
    memory = state_bytes(accelerator.unwrap_model(model), optimizer)
    link_times = time_allreduces(accelerator)
    profile = solo_step.profile() if rank == 0 else None
    if rank == 0:
        summary = summarize(cfg, opts, dev.type, n, step_s, times, communication, timer, link_times, profile,
                            parallel, traffic, memory)
        Path(opts.out).write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def traffic_per_step(parallel, accelerator, opts, timer: BucketTimer, communication: dict | None) -> dict:
    """Bytes this rank sent per step, by collective, as the ring algorithms send them: DDP's all-reduce of the
    replicated gradients (from its buckets, on the wire in fp32 or the hook's half precision) and, under hybrid
    and fsdp, the all-gathers, reduce-scatters and across-group all-reduces that parallel.py counts as each
    forward issues them (the plan's and FSDP2's collectives run inside torch); and the seconds per step spent in
    collectives, exposed (the step waited) and hidden (behind backward): DDP's from its hook, and the wait for
    hybrid's across-group all-reduce (the plan's and FSDP2's own collectives are not timed apart)."""
    steps = opts.windows * opts.steps
    n = accelerator.num_processes
    wire = 4 if opts.hook == "none" else 2
    ddp = Traffic()
    for bucket in timer.buckets.values():
        ddp.add_bytes("all-reduce", bucket["numel"] * wire, n)
    sent = {kind: value / steps for kind, value in parallel.traffic.sent.items()}
    sent["all-reduce"] = sent.get("all-reduce", 0.0) + ddp.sent.get("all-reduce", 0.0)
    blocking = parallel.traffic.wait_seconds / steps
    exposed = blocking + communication["exposed_s"] if communication else None
    return {"bytes_sent_per_step": {**sent, "total": sum(sent.values())},
            "collective_s": {"exposed": exposed, "hidden": communication["hidden_s"] if communication else None,
                             "tensor_parallel_and_shards": blocking}}


def time_windows(measurements: dict, recorders: dict, accelerator, opts, traffic=None) -> dict[str, list[float]]:
    """Seconds per step of each measurement in each window (solo: rank 0's clock; the others: the slowest
    rank's), after the warm-up steps. A recorder (the bucket timer, the solo step's profile) records during its
    measurement's windows only."""
    def sync():
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)

    for step in measurements.values():
        for _ in range(opts.warmup):
            step()
    sync()
    accelerator.wait_for_everyone()
    if traffic is not None:
        traffic.reset()  # count the timed steps only
    times = {name: [] for name in measurements}
    for _ in range(opts.windows):
        for name, step in measurements.items():
            for key, recorder in recorders.items():
                if recorder is not None:
                    recorder.recording = key == name
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            for _ in range(opts.steps):
                step()
            sync()
            elapsed = torch.tensor([(time.perf_counter() - start) / opts.steps], device=accelerator.device)
            slowest = accelerator.gather(elapsed)
            times[name].append(float(slowest[0] if name == "solo" else slowest.max()))
    for recorder in recorders.values():
        if recorder is not None:
            recorder.recording = False
    return times


def time_allreduces(accelerator, repeats: int = 3) -> dict[int, float]:
    """Median seconds of a plain fp32 all-reduce of each size in ALLREDUCE_SIZES_MB (the slowest rank's)."""
    result = {}
    for mb in ALLREDUCE_SIZES_MB:
        tensor = torch.ones(mb * 2**20 // 4, device=accelerator.device)
        samples = []
        for _ in range(repeats + 1):
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize(accelerator.device)
            samples.append(time.perf_counter() - start)
        elapsed = accelerator.gather(torch.tensor([statistics.median(samples[1:])], device=accelerator.device))
        result[mb * 2**20] = float(elapsed.max())
    return result


def summarize(cfg, opts, device_type: str, n, step_s, times, communication, timer, link_times, profile, parallel,
              traffic: dict, memory: dict) -> dict:
    """Rank 0's JSON object for one variant: the measured steps, the communication, the link fitted to the plain
    all-reduces, and the model's prediction for this case (with and without overlap) against the measurement."""
    link = fit_link(list(link_times), list(link_times.values()), n,
                    f"{dist.get_backend()} all-reduce of 1-64 MiB, {n} processes")
    wire = 4 if opts.hook == "none" else 2
    activation_bytes = 2 if opts.mixed_precision in ("bf16", "fp16") else 4
    # On a CPU whose every core computes, an all-reduce in flight takes cores from backward: no free overlap.
    overlap = device_type == "cuda"
    tp = parallel.tensor_parallel_size
    group = getattr(parallel, "shard_size", tp)  # the ranks that split the model's state

    def predicted(with_overlap: bool) -> dict:
        return predict(profile, opts.parallelism, n, cfg.batch_size, link, link, link, opts.bucket_mb, wire,
                       activation_bytes, group, overlap=with_overlap)

    model, model_overlap = predicted(overlap), predicted(True)
    solo_s, step = step_s["solo"], step_s[opts.parallelism]
    no_sync_s = step_s.get("no_sync")
    solo_rate = opts.solo_batch_size / solo_s
    rate = n * cfg.batch_size / step
    efficiency = rate / (n * solo_rate)
    strong = opts.solo_batch_size != cfg.batch_size
    exposed = communication["exposed_s"] if communication else None
    ms = 1e3
    replicated = [(name, numel) for name, numel in profile.sizes if name not in getattr(parallel, "planned", ())]
    return {
        "processes": n,
        "parallelism": opts.parallelism,
        "tensor_parallel_size": tp,
        "ddp_comm_hook": opts.hook,
        "ddp_bucket_mb": opts.bucket_mb,
        "batch_size_per_process": cfg.batch_size,
        "solo_batch_size": opts.solo_batch_size,
        "solo_images_per_sec": solo_rate,
        "no_sync_images_per_sec": n * cfg.batch_size / no_sync_s if no_sync_s else None,
        "images_per_sec": rate,
        "efficiency": efficiency,
        "weak_scaling_efficiency": None if strong else efficiency,
        "strong_scaling_efficiency": efficiency if strong else None,
        "no_sync_efficiency": solo_s / no_sync_s if no_sync_s and not strong else None,
        "step_s": step_s,
        "windows_step_s": times,
        "communication": communication,
        **traffic,  # bytes_sent_per_step, collective_s
        "state_bytes_per_rank": memory,
        "breakdown_ms": {
            "sharing_the_machine": (no_sync_s - solo_s) * ms if no_sync_s and not strong else None,
            "exposed_allreduce": exposed * ms if exposed is not None and no_sync_s else None,
            "compute_slowed_by_allreduce": (step - no_sync_s - exposed) * ms
            if exposed is not None and no_sync_s and not strong else None,
        },
        "buckets": [timer.buckets[i] for i in sorted(timer.buckets)],
        "link": {"bandwidth": link.bandwidth, "latency": link.latency, "source": link.source,
                 "allreduce_s": {str(k): v for k, v in link_times.items()}},
        "profile": profile.to_dict(),
        "model": {
            "overlap": overlap,
            "step_s": model["step_s"],
            "efficiency": model["images_per_sec"] / (n * opts.solo_batch_size / profile.step_s),
            "allreduce_s": model["allreduce_s"],
            "exposed_s": model["exposed_s"],
            "bytes_sent_per_step": model["bytes_sent_per_step"],
            "step_error": model["step_s"] / step - 1,
            "with_overlap": {"step_s": model_overlap["step_s"],
                             "efficiency": model_overlap["images_per_sec"] / (n * opts.solo_batch_size
                                                                              / profile.step_s),
                             "step_error": model_overlap["step_s"] / step - 1},
        },
        "model_buckets": [b for b in gradient_buckets(replicated, opts.bucket_mb)],
    }


def parse_worker_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dist_alexnet.perf.scaling_benchmark",
                                     description="one process of `dist-alexnet benchmark --processes N`")
    parser.add_argument("--out", required=True)
    parser.add_argument("--hook", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--parallelism", choices=("ddp", "hybrid", "fsdp"), default="ddp")
    parser.add_argument("--tensor-parallel-size", type=int, default=None)
    for name, kind in (("bucket-mb", int), ("threads", int), ("image-size", int), ("batch-size", int),
                       ("solo-batch-size", int),
                       ("model-width", float), ("steps", int), ("windows", int), ("warmup", int), ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--mixed-precision", default="no")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        worker(parse_worker_args(sys.argv[1:]))
    finally:
        # as after training (cli.run_train): free the DDP model and its gloo threads while the interpreter is
        # fully alive, or their destruction at shutdown can abort the process
        gc.collect()
