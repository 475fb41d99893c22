"""The end-of-run report: RUN_DIR/report.md with its figures as PNG files next to it.

Built only from what the run directory holds: the event files in tensorboard/ (curves, images, the
command, warnings), plus metrics.json and config.yaml when the run got that far. The trainer writes it at
the end of a run; `dist-alexnet report RUN_DIR` rebuilds it, e.g. for a run that was stopped early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from dist_alexnet.datasets import CLASS_NAMES
from dist_alexnet.errors import ReportError
from dist_alexnet.figures import accuracy_figure, loss_figure, throughput_figure, to_png
from dist_alexnet.rundir import RunDir, read_metrics, write_atomically
from dist_alexnet.monitor import class_tag


@dataclass
class Events:
    """One run's TensorBoard data, each series sorted by step (a later event for the same step wins)."""

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)  # PNG bytes
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def last(self, tag: str, default=None):
        series = self.scalars.get(tag)
        return series[-1][1] if series else default


def read_events(tensorboard_dir: Path) -> Events:
    """Everything in the run's event files, read with TensorBoard's own reader."""
    if not list(Path(tensorboard_dir).glob("events.out.tfevents.*")):
        raise ReportError(f"{tensorboard_dir} holds no TensorBoard event files; give the directory of a run "
                          f"made by `dist-alexnet train` (it has tensorboard/ inside)")
    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()

    def by_step(pairs):
        return sorted(dict(pairs).items())

    events = Events()
    for tag in tags["scalars"]:
        events.scalars[tag] = by_step((e.step, e.value) for e in acc.Scalars(tag))
    for tag in tags["images"]:
        events.images[tag] = by_step((e.step, e.encoded_image_string) for e in acc.Images(tag))
    for tag in tags["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "text":
            events.texts[tag] = by_step((e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
                                        for e in acc.Tensors(tag))
    return events


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and its PNG files into run_dir; return the report's path. A file that cannot be written
    (a read-only run directory, a full disk) is an OSError naming it; `dist-alexnet report` makes it one line."""
    run_dir = RunDir(run_dir)
    if not run_dir.path.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    events = read_events(run_dir.tensorboard)
    metrics = read_metrics(run_dir.metrics)
    config = read_config_text(run_dir.config) or _uncode(_text(events, "run/config"))

    s = events.scalars
    curves = {"loss.png": (loss_figure, "train/loss", "test/loss"),
              "accuracy.png": (accuracy_figure, "train/acc", "test/acc"),
              "throughput.png": (throughput_figure, "perf/images_per_sec", "perf/data_wait_fraction")}
    figures = {}
    for name, (draw, main, extra) in curves.items():
        if s.get(main):
            write_atomically(run_dir.figure(name), to_png(draw(s[main], s.get(extra))))
            figures[name] = True
    # Images TensorBoard already holds as PNG: the last one of each, as written during training.
    for name, tag in (("confusion_matrix.png", "test/confusion_matrix"), ("class_accuracy.png", "test/class_accuracy"),
                      ("misclassified.png", "test/misclassified"), ("inputs.png", "inputs/train_batch")):
        if events.images.get(tag):
            write_atomically(run_dir.figure(name), events.images[tag][-1][1])
            figures[name] = True

    lines = [f"# Run report: {run_dir.path.resolve().name}", ""]
    lines += _headline(events, metrics)
    warnings = [text for tag in sorted(events.texts) if tag.startswith("warnings/")
                for _, text in events.texts[tag]]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- **{w}**" for w in warnings]
    lines += ["", "## Curves", "",
              "Loss and accuracy over optimizer steps: training values are averages over the `--log-every` "
              "steps before each point (dropout on); test values cover the whole test set after each epoch. "
              "The dotted lines mark chance level (a uniform guess over 10 classes).", ""]
    lines += [f"![{name[:-4]}]({name})" for name in ("loss.png", "accuracy.png", "throughput.png") if name in figures]
    lines += ["", "## Final evaluation", ""]
    if "confusion_matrix.png" in figures:
        lines += ["Confusion matrix of the last evaluation (rows: true class, columns: predicted class; "
                  "colour = share of the true class):", "", "![confusion matrix](confusion_matrix.png)", ""]
    lines += _per_class_table(events)
    if "misclassified.png" in figures:
        lines += ["", "Some misclassified test images:", "", "![misclassified](misclassified.png)"]
    if "inputs.png" in figures:
        lines += ["", "## Inputs", "",
                  "The first training batch as the model saw it (after resizing and any augmentation):", "",
                  "![first training batch](inputs.png)"]
    lines += ["", "## Reproduce", ""]
    command = _uncode(_text(events, "run/command"))
    if command:
        lines += [f"{_text(events, 'run/launcher')}:", "", "```bash", command, "```"]
    else:
        lines += ["(the event files hold no command)"]
    lines += ["", "## Configuration", "", "```yaml", config.rstrip("\n"), "```", "",
              "Rebuild this report: `dist-alexnet report RUN_DIR`. Watch the run: "
              "`tensorboard --logdir RUN_DIR/tensorboard`.", ""]
    report = run_dir.report
    write_atomically(report, "\n".join(lines))
    return report


def read_config_text(path: Path) -> str | None:
    """config.yaml's text, or None when it is missing or cannot be read (the events hold the same)."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _number(value, spec: str, missing: str = "n/a") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else missing


def _headline(events: Events, metrics: dict | None) -> list[str]:
    """The numbers that judge the run: from metrics.json, else (the run did not finish) the last events."""
    if metrics is None:
        last_step = max((s[-1][0] for s in events.scalars.values() if s), default=0)
        test_acc = events.last("test/acc", math.nan)
        return ["**The run did not finish** (no complete metrics.json): the numbers are the last ones logged.", "",
                "| | |", "|---|---|",
                f"| test accuracy | {test_acc:.4f} |",
                f"| test loss | {events.last('test/loss', math.nan):.4f} |",
                f"| training loss | {events.last('train/loss', math.nan):.4f} |",
                f"| last logged step | {last_step} |"]
    m = metrics
    return ["| | |", "|---|---|",
            f"| test accuracy | **{m['test_acc']:.4f}** ({m['test_correct']}/{m['test_samples']} test images) |",
            f"| test loss | {_number(m['test_loss'], '.4f')} |",
            f"| final training loss | {_number(m['train_loss'], '.4f')} |",
            f"| optimizer steps / epochs | {m['steps']} / {m['epochs']} |",
            f"| processes | {m['world_size']} ({m['distributed_type']}), mixed precision {m['mixed_precision']} |",
            f"| training throughput | {_number(m['train_images_per_sec'], '.0f', 'n/a (this launch trained nothing)')}"
            f"{' images/s' if isinstance(m['train_images_per_sec'], (int, float)) else ''} |",
            f"| wall time | {_number(m['wall_seconds'], '.1f')} s |"]


def _per_class_table(events: Events) -> list[str]:
    rows = [(name, events.last(class_tag(name))) for name in CLASS_NAMES]
    if all(acc is None for _, acc in rows):
        return []
    return ["| class | test accuracy |", "|---|---|"] + [
        f"| {name} | {acc:.4f} |" if acc is not None else f"| {name} | |" for name, acc in rows]


def _text(events: Events, tag: str) -> str:
    series = events.texts.get(tag)
    return series[-1][1] if series else ""


def _uncode(markdown: str) -> str:
    """Undo monitor._code(): drop the 4-space indentation of a markdown code block."""
    return "\n".join(line[4:] if line.startswith("    ") else line for line in markdown.splitlines())
