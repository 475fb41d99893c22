"""Monitoring end to end: the TensorBoard data of a real 2-process run, read back with TensorBoard's own
reader and served by a real TensorBoard server; the end-of-run report and its rebuild by
`dist-alexnet report`; the chance-level and non-finite-loss warnings. One 2-process run is shared by
the first tests (module-scoped fixture)."""

import json
import math
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from dist_alexnet.datasets import CLASS_NAMES
from dist_alexnet.monitor import CUDA_ONLY_TAGS, EMA_ONLY_TAGS, FP16_ONLY_TAGS, TAGS, WARNING_TAGS, class_tag
from dist_alexnet.report import read_events, write_report
from tests.helpers import (BIN, LOG_EVERY, REPO, accelerate_launch, cpu_env, event_record, free_port, metrics, run,
                           steps_per_epoch, stop, tiny_split, train_tiny)

STEPS = 2 * steps_per_epoch(2)  # 2 epochs, 2 processes
IMAGE_TAGS = {"inputs/train_batch", "test/confusion_matrix", "test/class_accuracy", "test/misclassified"}
TEXT_TAGS = {"run/config", "run/command", "run/launcher", "run/summary"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """A 2-epoch, 2-process run with augmentation; returns (run directory, its stdout)."""
    run_dir = tmp_path_factory.mktemp("monitor") / "run"
    # (under the launcher: the report says how to run it again)
    result = train_tiny(run_dir, data_dir, "--epochs", "2", "--augment", "--log-figures", processes=2,
                        launcher=accelerate_launch(2))
    return run_dir, result.stdout


def expected_scalar_tags() -> set[str]:
    """Every scalar tag of TAGS that a CPU run without fp16 or a weight average writes."""
    tags = {t for t in TAGS if t.split("/")[0] in ("train", "test", "perf", "system")} - IMAGE_TAGS
    tags -= set(CUDA_ONLY_TAGS) | set(FP16_ONLY_TAGS) | set(EMA_ONLY_TAGS) | {"test/class_acc/<class>"}
    return tags | {class_tag(name) for name in CLASS_NAMES}


def test_event_file_holds_every_tag_written_by_one_process(tiny_run, data_dir):
    run_dir, stdout = tiny_run
    m = metrics(run_dir)
    # one writer: a single event file, no sub-runs (hparams live in the same file)
    assert [p.name for p in (run_dir / "tensorboard").iterdir()] == \
        [p.name for p in (run_dir / "tensorboard").glob("events.out.tfevents.*")]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert stdout.count("report: ") == 1

    acc = event_record(run_dir)  # every event as written: a step written twice would show
    tags = acc.Tags()
    assert set(tags["scalars"]) == expected_scalar_tags()
    assert set(tags["images"]) == IMAGE_TAGS
    text_tags = {t for t in tags["tensors"] if acc.SummaryMetadata(t).plugin_data.plugin_name == "text"}
    assert TEXT_TAGS <= text_tags <= TEXT_TAGS | set(WARNING_TAGS)

    for tag in tags["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: steps not strictly increasing: {steps}"
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    log_steps = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    epoch_ends = [STEPS // 2, STEPS]
    for tag in ("train/loss", "train/acc", "train/lr", "train/grad_norm", "perf/images_per_sec",
                "perf/step_time_ms", "perf/data_wait_fraction"):
        assert [e.step for e in acc.Scalars(tag)] == log_steps, tag
    for tag in ("test/loss", "test/acc", "perf/epoch_seconds", class_tag("Ankle boot")):
        assert [e.step for e in acc.Scalars(tag)] == epoch_ends, tag
    assert [e.step for e in acc.Images("test/confusion_matrix")] == epoch_ends
    assert [e.step for e in acc.Images("inputs/train_batch")] == [0]

    last = {tag: acc.Scalars(tag)[-1].value for tag in tags["scalars"]}
    assert last["test/acc"] == pytest.approx(m["test_acc"], rel=1e-6)  # TensorBoard stores float32
    assert last["test/loss"] == pytest.approx(m["test_loss"], rel=1e-6)
    assert last["train/loss"] == pytest.approx(m["train_loss"], rel=1e-6)
    assert last["train/lr"] == pytest.approx(1e-3)
    assert 0 < last["train/grad_norm"] < 1e3
    assert 0 <= last["perf/data_wait_fraction"] <= 1 and last["perf/step_time_ms"] > 0
    assert last["perf/images_per_sec_per_device"] * 2 == pytest.approx(last["perf/images_per_sec"], rel=1e-5)
    # per-class accuracies, weighted by the number of test images of each class, give the overall accuracy
    test = tiny_split(data_dir)
    per_class = [last[class_tag(name)] for name in CLASS_NAMES]
    sizes = test.labels.bincount(minlength=10).tolist()
    assert sum(a * n for a, n in zip(per_class, sizes)) / len(test) == pytest.approx(m["test_acc"], rel=1e-6)

    # hparams: this run's config as one session in its own event file
    session = hparams_metadata.parse_session_start_info_plugin_data(
        acc.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content)
    assert session.hparams["lr"].number_value == pytest.approx(1e-3)
    assert session.hparams["world_size"].number_value == 2
    assert session.hparams["dataset"].string_value == "synthetic"


# Straight to the local server: no proxy, whatever the environment says (or said when urllib's shared
# opener was first built).
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, body: dict | None = None):
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"X-XSRF-Protected": "1", "Content-Type": "application/json"})
    with LOCAL.open(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_real_tensorboard_server_serves_the_run(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    m = metrics(run_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "tensorboard.log", "w") as log:
        server = subprocess.Popen([str(BIN / "tensorboard"), "--logdir", str(run_dir), "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # until it answers and has loaded the run
            try:
                if get_json(f"{base}/data/runs"):
                    break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            assert time.monotonic() < deadline, "TensorBoard did not answer within 60 s"
            time.sleep(0.3)
        assert get_json(f"{base}/data/runs") == ["tensorboard"]  # one run, no stray sub-run

        loss = get_json(f"{base}/data/plugin/scalars/scalars?run=tensorboard&tag=train/loss")
        assert [step for _, step, _ in loss] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        test_acc = get_json(f"{base}/data/plugin/scalars/scalars?run=tensorboard&tag=test/acc")
        assert [step for _, step, _ in test_acc] == [STEPS // 2, STEPS]
        assert test_acc[-1][2] == pytest.approx(m["test_acc"], rel=1e-6)

        experiment = get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {"lr", "batch_size", "world_size", "mixed_precision"} <= {h["name"] for h in experiment["hparamInfos"]}
        assert "test/acc" in {metric["name"]["tag"] for metric in experiment["metricInfos"]}
        groups = get_json(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]})
        (group,) = groups["sessionGroups"]  # one row for the run
        assert [s["name"] for s in group["sessions"]] == ["tensorboard"]
        values = {v["name"]["tag"]: v["value"] for v in group["metricValues"]}
        assert values["test/acc"] == pytest.approx(m["test_acc"], rel=1e-6)
        assert group["hparams"]["lr"] == pytest.approx(1e-3)

        images = get_json(f"{base}/data/plugin/images/tags")
        assert set(images["tensorboard"]) == IMAGE_TAGS
        assert images["tensorboard"]["test/confusion_matrix"]["samples"] >= 1
        assert TEXT_TAGS <= set(get_json(f"{base}/data/plugin/text/tags")["tensorboard"])
    finally:
        stop(server)


def report_links(report: Path) -> list[Path]:
    return [report.parent / name for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


def test_report_links_valid_pngs_and_states_the_metrics(tiny_run):
    run_dir, _ = tiny_run
    m = metrics(run_dir)
    report = run_dir / "report.md"
    text = report.read_text()

    links = report_links(report)
    assert {p.name for p in links} == {"loss.png", "accuracy.png", "throughput.png", "confusion_matrix.png",
                                       "misclassified.png", "inputs.png"}
    for png in links:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.width >= 100 and image.height >= 100

    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", text, flags=re.M))
    assert rows["test accuracy"] == f"**{m['test_acc']:.4f}** ({m['test_correct']}/{m['test_samples']} test images)"
    assert m["test_correct"] / m["test_samples"] == m["test_acc"]
    assert float(rows["test loss"]) == round(m["test_loss"], 4)
    assert float(rows["final training loss"]) == round(m["train_loss"], 4)
    assert rows["optimizer steps / epochs"] == f"{m['steps']} / {m['epochs']}"
    assert rows["processes"].startswith(f"{m['world_size']} (MULTI_CPU)")
    assert rows["training throughput"] == f"{m['train_images_per_sec']:.0f} images/s"
    # per-class accuracy table
    assert all(name in rows for name in CLASS_NAMES)
    # the reproducing command is the launcher's, as launched
    command = text.split("```bash\n")[1].split("```")[0]
    assert "accelerate launch" in command and "--num_processes 2" in command
    assert f"--output-dir {run_dir}" in command and "launched by accelerate launch (2 process(es))" in text


def test_report_command_rebuilds_the_report_from_the_event_files(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    original = (run_dir / "report.md").read_text()
    for png in report_links(run_dir / "report.md"):
        png.unlink()
    (run_dir / "report.md").unlink()
    result = run([str(run_dir)], subcommand="report", timeout=120)
    assert result.stdout.strip() == str(run_dir / "report.md")
    assert (run_dir / "report.md").read_text() == original
    assert all(png.exists() for png in report_links(run_dir / "report.md"))


def test_report_of_a_directory_without_events_is_a_one_line_error(tmp_path):
    result = run([str(tmp_path)], subcommand="report", check=False)
    assert result.returncode == 2
    err = result.stderr
    assert err.startswith("dist-alexnet: error: ") and "no TensorBoard event files" in err
    assert len(err.splitlines()) == 1


def test_divergence_is_reported_in_the_log_and_in_tensorboard(tmp_path, data_dir):
    """Adam with lr 1 blows the weights up: accuracy stays at chance after the first epoch."""
    run_dir = tmp_path / "run"
    result = train_tiny(run_dir, data_dir, "--epochs", "2", "--limit-train", "256", "--lr", "1")
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING: training diverged")]
    assert len(warnings) == 1, result.stdout
    assert "learning rate is too high for Adam (--lr 1)" in warnings[0]
    assert "warnings/divergence" in read_events(run_dir / "tensorboard").texts
    assert "learning rate is too high for Adam" in (run_dir / "report.md").read_text()


def test_a_non_finite_loss_is_explained_in_tensorboard(tmp_path, data_dir):
    """Training stops on a NaN loss (exit 3); TensorBoard holds the reason, and a report can still be made."""
    run_dir = tmp_path / "run"
    result = train_tiny(run_dir, data_dir, "--epochs", "1", check=False, env=cpu_env(DIST_ALEXNET_INJECT_NAN="0:6"))
    assert result.returncode == 3, result.stderr[-3000:]
    acc = event_record(run_dir)
    (event,) = acc.Tensors("warnings/divergence")
    message = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    assert event.step == 6 and "NaN/inf at step 6" in message and "too high for Adam" in message
    assert [e.step for e in acc.Scalars("train/loss")] == [4]  # logged before it stopped
    assert "did not finish" in write_report(run_dir).read_text()


def test_readme_explains_every_tag():
    readme = (REPO / "README.md").read_text()
    missing = [tag for tag in TAGS if f"`{tag}`" not in readme]
    assert not missing, f"README.md does not describe: {missing}"
