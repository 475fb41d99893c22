"""The scaling model's arithmetic, and `dist-alexnet benchmark --processes 2` run for real with torchrun."""

import json
import math

import pytest

from dist_alexnet.model import AlexNet
from dist_alexnet.parallel import PLANNED, SHARDED
from dist_alexnet.perf.measure import StepProfile, parameter_sizes
from dist_alexnet.perf.scaling_model import (MB, Link, fit_link, gradient_buckets, layer_flops_profile,
                                             predict_fsdp_step, predict_hybrid_step, predict_step,
                                             ring_allreduce_seconds, strong_table)
from tests.helpers import run

SIZES = parameter_sizes(AlexNet())
TOY = ["--image-size", "64", "--model-width", "0.125", "--batch-size", "8", "--steps", "2", "--windows", "2",
       "--warmup", "1"]


def test_the_ring_allreduce_time_is_the_textbook_formula():
    gradient_bytes = 58_299_082 * 4  # 233 MB of fp32 gradients
    assert ring_allreduce_seconds(gradient_bytes, 8, 50e9) == pytest.approx(2 * 7 / 8 * gradient_bytes / 50e9)
    assert ring_allreduce_seconds(gradient_bytes, 8, 50e9) == pytest.approx(8.16e-3, rel=1e-3)
    assert ring_allreduce_seconds(1e6, 2, 1e9, latency=1e-3) == pytest.approx(1e-3 + 1e-3)
    assert ring_allreduce_seconds(gradient_bytes, 1, 50e9) == 0.0


@pytest.mark.parametrize("bucket_mb", [1, 25, 100])
def test_the_buckets_hold_every_parameter_once_in_backward_order(bucket_mb):
    numel = dict(SIZES)
    buckets = gradient_buckets(SIZES, bucket_mb)
    assert [name for bucket in buckets for name in bucket] == [name for name, _ in reversed(SIZES)]
    for i, bucket in enumerate(buckets[:-1]):  # each closed as soon as it reached its cap, not before
        cap = 1 * MB if i == 0 else bucket_mb * MB
        assert sum(numel[n] for n in bucket) * 4 >= cap > sum(numel[n] for n in bucket[:-1]) * 4


def test_alexnets_buckets_at_25_mb_are_the_classifier_then_the_convolutions():
    groups = [{name.rsplit(".", 1)[0] for name in bucket} for bucket in gradient_buckets(SIZES, 25)]  # layers
    assert groups == [{"classifier.7", "classifier.4"}, {"classifier.1"},
                      {"features.10", "features.8", "features.6", "features.3", "features.0"}]


def test_the_model_hides_what_backward_covers_and_no_more():
    profile = layer_flops_profile(1.0, 224, step_s=0.0128, optimizer_s=0.5e-3, batch_size=512, source="test")
    assert profile.step_s == pytest.approx(0.0128)
    assert max(profile.ready_s.values()) == pytest.approx(profile.backward_s)  # conv 1's gradient comes last
    assert profile.ready_s["classifier.7.weight"] < profile.ready_s["features.0.weight"]
    assert predict_step(profile, 1, Link(1e9, 1e-3, "test"))["efficiency"] == 1.0
    assert predict_step(profile, 8, Link(math.inf, 0.0, "test"))["efficiency"] == 1.0
    slow = Link(10e9, 0.0, "test")
    serial = predict_step(profile, 8, slow, overlap=False)
    assert serial["exposed_s"] == pytest.approx(serial["allreduce_s"])
    assert serial["allreduce_s"] == pytest.approx(ring_allreduce_seconds(58_299_082 * 4, 8, 10e9))
    overlapped = predict_step(profile, 8, slow)
    assert 0 < overlapped["exposed_s"] < serial["exposed_s"]
    assert overlapped["step_s"] == pytest.approx(profile.step_s + overlapped["exposed_s"])
    bf16 = predict_step(profile, 8, slow, wire_bytes_per_element=2)
    assert bf16["allreduce_s"] == pytest.approx(overlapped["allreduce_s"] / 2)
    assert bf16["efficiency"] > overlapped["efficiency"]
    efficiencies = [predict_step(profile, n, slow)["efficiency"] for n in (2, 4, 8, 64)]
    assert efficiencies == sorted(efficiencies, reverse=True)
    # a bigger batch per GPU has more backward to hide the same bytes behind
    assert predict_step(profile.with_batch_size(1024), 8, slow)["efficiency"] > overlapped["efficiency"]


def test_a_link_fitted_to_ring_times_gives_back_its_bandwidth_and_latency():
    sizes = [1 * MB, 4 * MB, 16 * MB, 64 * MB]
    link = fit_link(sizes, [ring_allreduce_seconds(s, 2, 1.5e9, 2e-3) for s in sizes], 2, "test")
    assert link.bandwidth == pytest.approx(1.5e9) and link.latency == pytest.approx(2e-3)


def test_a_profile_survives_json():
    profile = layer_flops_profile(0.125, 64, step_s=0.01, optimizer_s=1e-3, batch_size=8, source="test")
    assert StepProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


@pytest.fixture(scope="module")
def two_process_benchmark(tmp_path_factory):
    path = tmp_path_factory.mktemp("scaling") / "scaling.json"
    result = run([*TOY, "--processes", "2", "--parallelism", "ddp", "hybrid", "fsdp", "--json", str(path)],
                 subcommand="benchmark", timeout=300)
    return json.loads(path.read_text()), result.stdout, path


VARIANT_FIELDS = {"processes", "parallelism", "tensor_parallel_size", "ddp_comm_hook", "ddp_bucket_mb",
                  "batch_size_per_process", "solo_batch_size", "solo_images_per_sec", "no_sync_images_per_sec",
                  "images_per_sec", "efficiency", "weak_scaling_efficiency", "strong_scaling_efficiency",
                  "no_sync_efficiency", "step_s", "windows_step_s", "communication", "bytes_sent_per_step",
                  "collective_s", "state_bytes_per_rank", "breakdown_ms", "buckets", "link", "profile", "model",
                  "model_buckets"}


@pytest.mark.slow
def test_the_two_process_benchmark_writes_every_field(two_process_benchmark):
    result, stdout, _ = two_process_benchmark
    assert result["processes"] == 2 and result["threads_per_process"] >= 1 and result["scaling"] == "weak"
    ddp, hybrid, fsdp = result["variants"]
    assert [v["parallelism"] for v in result["variants"]] == ["ddp", "hybrid", "fsdp"]
    assert hybrid["tensor_parallel_size"] == 2
    for v in result["variants"]:
        assert set(v) == VARIANT_FIELDS and v["processes"] == 2
        for key in ("solo_images_per_sec", "images_per_sec", "weak_scaling_efficiency"):
            assert math.isfinite(v[key]) and v[key] > 0, key
        assert v["weak_scaling_efficiency"] == pytest.approx(v["step_s"]["solo"] / v["step_s"][v["parallelism"]])
        assert v["strong_scaling_efficiency"] is None
        assert all(len(times) == 2 for times in v["windows_step_s"].values())
        comm = v["communication"]  # the DDP hook's figures (CPU; fsdp has no DDP)
        if v is not fsdp:
            assert comm["allreduce_s"] > 0 and 0 <= comm["exposed_s"] and 0 <= comm["overlap"] <= 1
            assert comm["hidden_s"] == pytest.approx(comm["allreduce_s"] - comm["exposed_s"], abs=1e-9)
        assert v["link"]["bandwidth"] > 0 and math.isfinite(v["link"]["bandwidth"])
        assert v["model"]["step_s"] > 0 and math.isfinite(v["model"]["step_error"])
        # the bytes counted as the collectives ran are the bytes the scaling model predicts
        assert v["bytes_sent_per_step"]["total"] == pytest.approx(v["model"]["bytes_sent_per_step"])
    assert ddp["no_sync_efficiency"] > 0 and hybrid["no_sync_efficiency"] is None
    assert set(hybrid["bytes_sent_per_step"]) == {"all-gather", "reduce-scatter", "all-reduce", "total"}
    assert hybrid["bytes_sent_per_step"]["total"] < ddp["bytes_sent_per_step"]["total"] / 5
    assert hybrid["state_bytes_per_rank"]["total"] < ddp["state_bytes_per_rank"]["total"] * 0.6
    # fsdp: half of everything per rank, for 3 x (n-1)/n of fc1's and fc2's bytes and 2 x of the rest's
    assert fsdp["state_bytes_per_rank"]["total"] <= ddp["state_bytes_per_rank"]["total"] * 0.51
    assert set(fsdp["bytes_sent_per_step"]) == {"all-gather", "reduce-scatter", "all-reduce", "total"}
    assert 1.3 < fsdp["bytes_sent_per_step"]["total"] / ddp["bytes_sent_per_step"]["total"] < 1.5
    assert "efficiency" in stdout and "hybrid, none, 25 MB" in stdout


def test_the_fsdp_model_steps_a_shard_of_the_state_and_sends_its_weights_three_times():
    profile = layer_flops_profile(1.0, 224, step_s=0.0128, optimizer_s=0.5e-3, batch_size=512, source="test")
    link = Link(100e9, 0.0, "test")
    numel = dict(SIZES)
    weights = sum(numel.values()) * 4
    gathered_again = sum(numel[f"classifier.{i}.{kind}"] for i in (1, 4) for kind in ("weight", "bias")) * 4
    one_node = predict_fsdp_step(profile, 8, 8, link, link)
    # forward's all-gather of every weight, backward's of fc1 and fc2, the reduce-scatter of every gradient
    assert one_node["bytes_sent_per_step"] == pytest.approx(7 / 8 * (2 * weights + gathered_again))
    assert 1.4 < one_node["bytes_sent_per_step"] / predict_step(profile, 8, link)["bytes_sent_per_step"] < 1.5
    assert one_node["compute_s"] == pytest.approx(profile.forward_s + profile.backward_s + profile.optimizer_s / 8)
    two_nodes = predict_fsdp_step(profile, 16, 8, link, link)  # + the shards' all-reduce across the 2 nodes
    assert two_nodes["bytes_sent_per_step"] - one_node["bytes_sent_per_step"] == pytest.approx(weights / 8)
    no_overlap = predict_fsdp_step(profile, 8, 8, link, link, overlap=False)
    assert no_overlap["exposed_s"] == pytest.approx(no_overlap["allreduce_s"])
    assert no_overlap["exposed_s"] > one_node["exposed_s"] > 0  # (the root unit's collectives stay exposed)


@pytest.mark.slow
def test_strong_scaling_splits_one_global_batch(tmp_path):
    path = tmp_path / "strong.json"
    run([*TOY, "--processes", "2", "--parallelism", "hybrid", "--ddp-comm-hook", "bf16", "--global-batch-size",
         "16", "--json", str(path)], subcommand="benchmark", timeout=300)
    result = json.loads(path.read_text())
    assert result["scaling"] == "strong" and result["batch_size_per_process"] == 8 and result["solo_batch_size"] == 16
    (v,) = result["variants"]
    assert v["weak_scaling_efficiency"] is None and v["strong_scaling_efficiency"] == v["efficiency"] > 0
    assert v["efficiency"] == pytest.approx(16 / v["step_s"]["hybrid"] / (2 * 16 / v["step_s"]["solo"]))
    assert v["bytes_sent_per_step"]["total"] == pytest.approx(v["model"]["bytes_sent_per_step"])


@pytest.mark.slow
def test_ddps_buckets_are_the_models_buckets(two_process_benchmark):
    result, _, _ = two_process_benchmark
    sizes = dict(parameter_sizes(AlexNet(width=0.125)))
    for v in result["variants"]:
        # DDP's own buckets, as its communication hook saw them, against the scaling model's
        assert [set(b["params"]) for b in v["buckets"]] == [set(names) for names in v["model_buckets"]]
        assert [b["numel"] for b in v["buckets"]] == [sum(sizes[n] for n in names) for names in v["model_buckets"]]


@pytest.mark.slow
def test_the_scaling_model_prints_the_gpu_table(two_process_benchmark, tmp_path):
    assumed = run(["--json", str(tmp_path / "table.json")], subcommand="scaling-model")
    assert "assumed H200 step" in assumed.stdout and "efficiency under 90% from" in assumed.stdout
    table = json.loads((tmp_path / "table.json").read_text())
    assert [row["gpus"] for row in table["rows"]] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert all(row[label]["efficiency"] == 1.0 for label in table["scenarios"] for row in table["rows"][:1])
    slower = run(["--inter-node-gbs", "22.5", "--json", str(tmp_path / "slower.json")], subcommand="scaling-model")
    assert "given on the command line" in slower.stdout
    half = json.loads((tmp_path / "slower.json").read_text())["rows"][4]["fp32 all-reduce, batch 512"]  # 16 GPUs
    assert half["efficiency"] < table["rows"][4]["fp32 all-reduce, batch 512"]["efficiency"]
    assert table["rows"][3] == json.loads((tmp_path / "slower.json").read_text())["rows"][3]  # 8 GPUs: NVLink
    measured = run(["--profile", str(two_process_benchmark[2])], subcommand="scaling-model")
    assert "measured on cpu, 1 process" in measured.stdout


def test_scaling_input_errors_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    for args, subcommand, message in [
        (["--processes", "0"], "benchmark", "--processes must be >= 1 (got 0)"),
        (["--processes", "2", "--ddp-bucket-mb", "0"], "benchmark", "--ddp-bucket-mb must be >= 1 (got 0)"),
        (["--processes", "2", "--threads-per-process", "0"], "benchmark", "--threads-per-process must be >= 1"),
        (["--processes", "2", "--global-batch-size", "7"], "benchmark", "must be a positive multiple of --processes"),
        (["--parallelism", "hybrid"], "benchmark", "are for --processes N > 1"),
        (["--processes", "4", "--parallelism", "hybrid", "--tensor-parallel-size", "3"], "benchmark",
         "--tensor-parallel-size 3 must divide --processes 4"),
        (["--profile", str(tmp_path / "bad.json")], "scaling-model", "not a step profile"),
        (["--profile", str(tmp_path / "missing.json")], "scaling-model", "not a step profile"),
        (["--inter-node-gbs", "0"], "scaling-model", "--inter-node-gbs must be a positive number (got 0.0)"),
    ]:
        result = run(args, subcommand=subcommand, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_hybrid_model_moves_activations_not_the_classifiers_gradients():
    profile = layer_flops_profile(1.0, 224, step_s=0.0128, optimizer_s=0.5e-3, batch_size=512, source="test")
    link = Link(100e9, 0.0, "test")
    one_node = predict_hybrid_step(profile, 8, 8, link, link, link, activation_bytes=2)
    numel = dict(SIZES)
    replicated = sum(numel.values()) - sum(numel[name] for name in PLANNED)
    exchange = 2 * 7 / 8 * 8 * 512 * (9216 + 4096) * 2  # all-gather + reduce-scatter, forward and backward, bf16
    assert one_node["bytes_sent_per_step"] == pytest.approx(exchange + 2 * 7 / 8 * replicated * 4)
    # the exchange grows with the group's batch (at 512 per GPU it is about the size of ddp's all-reduce), the
    # gradients do not: at 64 per GPU hybrid sends under 1/5 of ddp's bytes
    small = profile.with_batch_size(64)
    assert (predict_hybrid_step(small, 8, 8, link, link, link, activation_bytes=2)["bytes_sent_per_step"]
            < predict_step(small, 8, link)["bytes_sent_per_step"] / 5)
    # the optimizer steps the replicated part and 1/8 of the classifier
    assert one_node["compute_s"] < profile.step_s
    two_nodes = predict_hybrid_step(profile, 16, 8, link, link, link, activation_bytes=2)
    shards = sum(numel[name] / (8 if name in SHARDED else 1) for name in PLANNED) * 4  # (fc2's bias whole)
    assert two_nodes["bytes_sent_per_step"] - exchange - 2 * 15 / 16 * replicated * 4 == pytest.approx(shards)
    rows = strong_table(profile)
    assert {row["fastest"] for row in rows} <= {"ddp fp32", "ddp bf16 hook", "hybrid", "fsdp"}
    across_nodes = [row for row in rows if row["global_batch"] == 4096 and row["nodes"] >= 2]
    assert all(row["fastest"] in ("hybrid", "fsdp") for row in across_nodes)
    # at a few images per GPU across many nodes, moving activations beats moving weights
    assert all(row["fastest"] == "hybrid" for row in across_nodes if row["global_batch"] / row["gpus"] <= 64)
    assert all(row["hybrid"]["efficiency"] > row["ddp fp32"]["efficiency"] for row in across_nodes)
