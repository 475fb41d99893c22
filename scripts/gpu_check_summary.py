"""The last step of scripts/gpu_check.sh: <folder>/summary.json from the JSON files the check wrote there,
with each speed target of one H200, the value measured and whether it is met.

    python scripts/gpu_check_summary.py gpu-check
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def write_gpu_check_summary(folder: str | os.PathLike) -> dict:
    """Write <folder>/summary.json: each benchmark's main figures, the training
    run's epoch times, and each speed target of one H200 with the value measured and whether it is met."""
    folder = Path(folder)
    benchmarks = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("benchmark-*.json"))}
    train_file = folder / "train-metrics.json"
    train = json.loads(train_file.read_text()) if train_file.exists() else {}
    figures = ("trainer_images_per_sec", "reference_images_per_sec", "trainer_over_reference", "model_images_per_sec",
               "trainer_over_model",
               "torchvision_trainer_over_model", "pipeline_speedup", "mfu", "peak_memory_gib",
               "host_syncs_per_trainer_step")
    largest_batch = max((r["batch_size"] for r in benchmarks.values()), default=None)
    best = max((r for r in benchmarks.values() if r["batch_size"] == largest_batch),
               key=lambda r: r["trainer_images_per_sec"], default={})
    epochs = train.get("epoch_seconds", [])
    scaling = {p.stem: [{key: v[key] for key in ("parallelism", "ddp_comm_hook", "images_per_sec", "efficiency",
                                                 "bytes_sent_per_step", "state_bytes_per_rank")}
                        for v in json.loads(p.read_text())["variants"]]
               for p in sorted(folder.glob("scaling-benchmark*.json"))}

    def target(value, met) -> dict:
        return {"value": value, "met": value is not None and met(value)}

    summary = {
        "device_name": best.get("device_name"),
        "benchmarks": {name: {key: r[key] for key in figures} for name, r in benchmarks.items()},
        "train": {key: train.get(key) for key in ("world_size", "epoch_seconds", "train_images_per_sec",
                                                  "test_acc", "mixed_precision")},
        "scaling": scaling,  # several GPUs only: ddp and hybrid side by side
        "targets": {  # for one H200 at bf16; the largest batch is 512 on a GPU
            "trainer images/s >= 40000 at the largest batch": target(
                best.get("trainer_images_per_sec"), lambda v: v >= 40_000),
            "trainer_over_model >= 0.9 at the largest batch": target(
                best.get("trainer_over_model"), lambda v: v >= 0.9),
            "trainer_over_reference >= 0.85 at the largest batch (plain torch loop, fused Adam)": target(
                best.get("trainer_over_reference"), lambda v: v >= 0.85),
            "slowest epoch after the first <= 1.5 s": target(
                max(epochs[1:]) if len(epochs) > 1 else None, lambda v: v <= 1.5),
            "host-device syncs per trainer step <= 1 (the loop's stop check)": target(
                best.get("host_syncs_per_trainer_step"), lambda v: v <= 1),
        },
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["targets"], indent=2))
    return summary


if __name__ == "__main__":
    write_gpu_check_summary(sys.argv[1])
