"""The ecosystem around a run: MLflow (a local store, and a real server read back through its REST API) and W&B
(offline, read back from its run files) get the same scalars as TensorBoard and metrics.json, and a resumed run
continues their runs with no step twice; the Hugging Face-style export loads with from_pretrained and
torch.hub; the ONNX export matches PyTorch (and a damaged one is caught), and predict --onnx runs without
torch; the profiler writes a trace per rank; the old export format still loads."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_alexnet.checkpoint import list_checkpoints
from tests.helpers import (BIN, REPO, Lines, cpu_env, free_port, metrics, run, scalars, start, stop, tiny_args,
                           tiny_split)


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (an optional extra; make test installs it)")


# ----------------------------------------------------------------------------- MLflow

def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def assert_same_as_tensorboard(history: dict[str, list[tuple[int, float]]], run_dir: Path) -> None:
    """Every tracker step and value equals TensorBoard's (which stores float32), the last test/acc metrics.json."""
    for tag, points in history.items():
        board = scalars(run_dir, tag)
        assert [step for step, _ in points] == [step for step, _ in board], tag
        assert [value for _, value in points] == pytest.approx([value for _, value in board], rel=1e-6), tag
    assert history["test/acc"][-1][1] == pytest.approx(metrics(run_dir)["test_acc"], rel=1e-12)


@pytest.mark.slow
@needs("mlflow")
def test_mlflow_gets_the_tensorboard_scalars_and_a_resumed_run_continues_its_run(tmp_path, data_dir):
    uri, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"  # a local store: one database file
    env = cpu_env(MLFLOW_TRACKING_URI=uri)
    args = tiny_args(data_dir, run_dir, "--epochs", "2", "--checkpoint-every", "8", "--report-to", "tensorboard,mlflow")
    # interrupted after it logged step 12 (its last checkpoint: step 8), then resumed to the end
    first = start(args, env=env)
    output = Lines(first)
    try:
        output.wait_for("step 12/")
        first.send_signal(signal.SIGKILL)
        output.finish()
    finally:
        first.kill()
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"]
    result = run(args, env=env, in_process=False)
    assert "resumed from" in result.stdout and "at step 8" in result.stdout
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"] == run_id  # the same MLflow run
    history = {tag: mlflow_history(uri, run_id, tag) for tag in ("train/loss", "train/lr", "test/acc")}
    assert [step for step, _ in history["train/loss"]] == list(range(4, 65, 4))  # each step once
    assert_same_as_tensorboard(history, run_dir)


@pytest.mark.slow
@needs("mlflow")
def test_a_real_mlflow_server_gets_the_run(tmp_path, data_dir):
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   "--default-artifact-root", str(tmp_path / "artifacts")],
                                  stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        started, deadline = time.monotonic(), time.monotonic() + 60
        while True:
            try:
                if local.open(f"{base}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.3)
        print(f"mlflow server answered after {time.monotonic() - started:.1f} s")
        run_dir = tmp_path / "run"
        run(tiny_args(data_dir, run_dir, "--epochs", "1", "--report-to", "all"), in_process=False,
            env=cpu_env(MLFLOW_TRACKING_URI=base, WANDB_MODE="offline", WANDB_SILENT="true"))
        run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow_run_id"]
        history = {}
        for tag in ("train/loss", "test/acc"):
            query = urllib.parse.urlencode({"run_id": run_id, "metric_key": tag})
            reply = json.loads(local.open(f"{base}/api/2.0/mlflow/metrics/get-history?{query}", timeout=10).read())
            history[tag] = sorted((m["step"], m["value"]) for m in reply["metrics"])
        assert_same_as_tensorboard(history, run_dir)
    finally:
        stop(server)


# ----------------------------------------------------------------------------- W&B

def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of every offline W&B run in <run_dir>/wandb, oldest first: W&B writes its records in
    LevelDB's log framing (a 7-byte file header, 32 KiB blocks of checksum, length, type, payload)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, partial = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # too little room left in the block for a header: padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            partial = payload if kind in (1, 2) else partial + payload
            if kind in (1, 4):  # a whole record, or the last part of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(partial)
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


@pytest.mark.slow
@needs("wandb")
def test_wandb_offline_gets_the_same_scalars_and_tensorboard_can_be_left_out(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    env = cpu_env(WANDB_MODE="offline", WANDB_SILENT="true")
    cut = run(tiny_args(data_dir, run_dir, "--epochs", "2", "--max-steps", "20", "--report-to", "wandb,tensorboard"),
              env=env, in_process=False)
    assert "watch it: tensorboard" in cut.stdout
    run(tiny_args(data_dir, run_dir, "--epochs", "2", "--report-to", "wandb,tensorboard"), env=env, in_process=False)
    rows = wandb_history(run_dir)
    run_ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert run_ids == {json.loads((run_dir / "trackers.json").read_text())["wandb_run_id"]}  # one W&B run, resumed
    history = {tag: [(row["_step"], row[tag]) for row in rows if tag in row] for tag in ("train/loss", "test/acc")}
    assert [step for step, _ in history["train/loss"]] == [*range(4, 21, 4), *range(24, 65, 4)]
    assert_same_as_tensorboard(history, run_dir)

    alone = tmp_path / "alone"  # W&B only: no TensorBoard events, no report, metrics.json all the same
    result = run(tiny_args(data_dir, alone, "--max-steps", "4", "--report-to", "wandb"), env=env, in_process=False)
    assert not (alone / "tensorboard").exists() and "report: none" in result.stdout
    assert metrics(alone)["steps"] == 4


def test_a_missing_tracker_extra_is_one_line(tmp_path, data_dir):
    result = run(tiny_args(data_dir, tmp_path / "run", "--report-to", "mlflow"), blocked_imports=("mlflow",),
                 check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("dist-alexnet: error: --report-to mlflow needs the mlflow extra: pip install "
                                     "'dist-alexnet[mlflow]'")


# ----------------------------------------------------------------------------- the export

def test_an_export_loads_with_from_pretrained_and_torch_hub(tmp_path, trained_run):
    from dist_alexnet.inference import load_trained_model
    from dist_alexnet.model import AlexNet

    folder = tmp_path / "export"
    run(["--checkpoint", str(trained_run), "--out", str(folder)], subcommand="export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    config = json.loads((folder / "config.json").read_text())
    assert (config["width"], config["image_size"], config["num_classes"], config["dropout"]) == (0.125, 64, 10, 0.5)
    assert config["metrics"]["test_acc"] == metrics(trained_run)["test_acc"]
    assert config["training_config"]["dataset"] == "synthetic" and config["source_checkpoint"].endswith("step_000064")
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: dist-alexnet", "pipeline_tag: image-classification", "- fashion_mnist",
                 "license: mit", f"value: {metrics(trained_run)['test_acc']}"):
        assert line in front, line

    images = torch.randn(4, 1, 64, 64)
    original = load_trained_model(list_checkpoints(trained_run)[-1]).model
    expected = original(images)
    assert torch.equal(AlexNet.from_pretrained(folder).eval()(images), expected)
    hub = torch.hub.load(str(REPO), "alexnet", source="local", weights=str(folder))
    assert torch.equal(hub(images), expected)


def test_an_export_of_version_0_1_still_loads(tmp_path, trained_run):
    """model.safetensors next to a model_card.json, format dist-alexnet-export/1."""
    old = tmp_path / "old"
    old.mkdir()
    checkpoint = list_checkpoints(trained_run)[-1]
    save_file(load_file(checkpoint / "model.safetensors"), old / "model.safetensors",
              metadata={"format": "dist-alexnet-export/1"})
    config = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
    (old / "model_card.json").write_text(json.dumps({"format": "dist-alexnet-export/1", "training_config": config,
                                                     "trainer_state": {"step": 64}, "metrics": {}}))
    evaluated = json.loads(run(["--checkpoint", str(old), "--json"], subcommand="evaluate").stdout)
    assert evaluated["test_acc"] == metrics(trained_run)["test_acc"]


def test_push_to_hub_offline_is_one_line_after_a_complete_export(tmp_path, trained_run):
    result = run(["--checkpoint", str(trained_run), "--out", str(tmp_path / "export"), "--push-to-hub",
                  "someone/dist-alexnet-test"], subcommand="export", check=False,
                 env=cpu_env(HF_HUB_OFFLINE="1"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("dist-alexnet: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "could not push" in errors[0] and "huggingface-cli upload someone/dist-alexnet-test" in errors[0]
    assert (tmp_path / "export" / "model.safetensors").exists()  # the export itself is complete


# ----------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, trained_run):
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnx, onnxscript or onnxruntime is not installed (the [onnx] extra; make test installs it)")
    folder = tmp_path_factory.mktemp("onnx") / "export"
    run(["--checkpoint", str(trained_run), "--out", str(folder), "--format", "onnx"], subcommand="export")
    return folder


def test_the_onnx_export_matches_pytorch_and_says_so(onnx_export):
    parity = json.loads((onnx_export / "config.json").read_text())["onnx"]
    assert parity["images"] == 256 and parity["argmax_agreement"] == 1.0
    assert parity["max_abs_logit_difference"] < 1e-3  # the bound the check enforces
    assert "top-1 agreement 100%" in (onnx_export / "README.md").read_text()
    print(f"ONNX parity on 256 real test images: max |logit difference| {parity['max_abs_logit_difference']:.2e}, "
          f"max |probability difference| {parity['max_abs_probability_difference']:.2e}, argmax agreement "
          f"{parity['argmax_agreement']:.0%}")


def test_predict_onnx_runs_without_torch_and_agrees_with_the_checkpoint(onnx_export, trained_run, data_dir,
                                                                         tmp_path):
    test = tiny_split(data_dir)
    for i, image in enumerate(test.images):
        Image.fromarray(image.numpy(), mode="L").save(tmp_path / f"{i:04d}.png")
    onnx = run(["--onnx", "--checkpoint", str(onnx_export), "--json", str(tmp_path)], subcommand="predict",
               blocked_imports=("torch",), timeout=120)  # any import of torch fails
    checkpoint = run(["--checkpoint", str(list_checkpoints(trained_run)[-1]), "--json", str(tmp_path)],
                     subcommand="predict")
    onnx_classes = [p["class_index"] for p in json.loads(onnx.stdout)["predictions"]]
    assert onnx_classes == [p["class_index"] for p in json.loads(checkpoint.stdout)["predictions"]]
    assert sum(c == int(label) for c, label in zip(onnx_classes, test.labels)) == metrics(trained_run)["test_correct"]


def test_the_exports_model_onnx_file_is_accepted_as_the_checkpoint(onnx_export):
    from dist_alexnet.serving import onnx_classifier

    assert onnx_classifier(onnx_export / "model.onnx").source == onnx_classifier(onnx_export).source == onnx_export


def test_a_damaged_onnx_export_is_caught(onnx_export, tmp_path):
    import onnx
    from onnx import numpy_helper

    from dist_alexnet.errors import ExportError
    from dist_alexnet.export import ServingModel, check_onnx
    from dist_alexnet.model import AlexNet

    tampered = shutil.copytree(onnx_export, tmp_path / "tampered")
    graph = onnx.load(tampered / "model.onnx")
    weight = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))  # the biggest weight matrix
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(graph, tampered / "model.onnx")
    serving = ServingModel(AlexNet.from_pretrained(tampered).eval(), 64).eval()
    with pytest.raises(ExportError, match="does not match the model"):
        check_onnx(serving, tampered / "model.onnx")

    (tampered / "model.onnx").write_bytes((onnx_export / "model.onnx").read_bytes()[:1000])  # cut short
    result = run(["--onnx", "--checkpoint", str(tampered), str(tmp_path)], subcommand="predict", check=False)
    assert result.returncode == 2 and "is not a model ONNX Runtime can load" in result.stderr


# ----------------------------------------------------------------------------- the profiler

def test_the_profiler_writes_a_trace_that_names_the_convolutions(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = run(tiny_args(data_dir, run_dir, "--max-steps", "4", "--profile-steps", "2:3"))
    trace = json.loads((run_dir / "profile" / "rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("convolution" in name for name in names), sorted(names)[:50]
    assert "profile of steps 2-3" in result.stdout and "Self CPU" in result.stdout
    table = result.stdout.split("the top 10 operators by self time:")[1]
    print("top operators by self time on CPU:\n" + "\n".join(table.splitlines()[:9]))


@pytest.mark.slow
def test_sigterm_during_an_onnx_export_leaves_nothing_behind(trained_run, tmp_path):
    """A signal while the export is being built (the ONNX graph and its parity check take seconds): one line,
    exit 130, and neither the half-built folder nor a partial --out is left."""
    import signal
    import time

    out = tmp_path / "export"
    proc = start(["--checkpoint", str(trained_run), "--out", str(out), "--format", "onnx"], subcommand="export")
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".export.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert list(tmp_path.glob(".export.tmp-*")), "the export never started building"
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in output, output[-3000:]
    assert "dist-alexnet: error: stopped by SIGTERM" in output
    assert sorted(path.name for path in tmp_path.iterdir()) == []
