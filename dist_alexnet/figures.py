"""Figures for TensorBoard images and the end-of-run report, drawn with matplotlib.

Uses matplotlib's object API with the Agg canvas: no pyplot, so no global state and no display needed.
Each function returns a Figure; to_png() and to_rgb() turn it into a PNG file's bytes or an image array.
"""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dist_alexnet.datasets import CLASS_NAMES

CHANCE_LOSS = math.log(len(CLASS_NAMES))  # cross-entropy of a uniform guess: ln(10) = 2.303
CHANCE_ACC = 1 / len(CLASS_NAMES)

Series = list[tuple[int, float]]  # (step, value) pairs


def new_figure(width: float, height: float):
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def to_png(figure) -> bytes:
    buffer = BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def to_rgb(figure):
    """The figure as an [H, W, 3] uint8 numpy array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --- evaluation

def confusion_matrix_figure(confusion: torch.Tensor, title: str):
    counts = confusion.numpy()
    shares = counts / counts.sum(1, keepdims=True).clip(min=1)
    fig = new_figure(7.5, 6.5)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    for i in range(len(CLASS_NAMES)):
        for j in range(len(CLASS_NAMES)):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix, {title}")
    return fig


def class_accuracy_figure(per_class: list[float], title: str):
    fig = new_figure(7, 4)
    ax = fig.subplots()
    ax.barh(range(len(per_class)), per_class, color="tab:blue")
    for i, acc in enumerate(per_class):
        ax.text(min(acc, 0.88) + 0.01, i, f"{acc:.1%}", va="center", fontsize=8)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.axvline(CHANCE_ACC, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("test accuracy (dotted: chance)")
    ax.set_title(f"per-class accuracy, {title}")
    return fig


def misclassified_figure(images: torch.Tensor, predicted: list[int], true: list[int]):
    """Up to 12 uint8 [28, 28] images, each titled with its predicted and true class."""
    fig = new_figure(9, 3.8)
    axes = fig.subplots(2, 6).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, image, p, t in zip(axes, images, predicted, true):
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"predicted {CLASS_NAMES[p]}\ntrue {CLASS_NAMES[t]}", fontsize=7)
    if not predicted:
        axes[0].set_title("no misclassified test images", fontsize=9, loc="left")
    return fig


# --- curves

def _plot(ax, series: Series | None, label: str, **style) -> None:
    if series:
        steps, values = zip(*series)
        ax.plot(steps, values, label=label, **style)


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def loss_figure(train: Series, test: Series | None):
    return _train_and_test_figure(train, test, "loss", CHANCE_LOSS, "chance (ln 10)", "cross-entropy loss")


def accuracy_figure(train: Series, test: Series | None):
    fig = _train_and_test_figure(train, test, "accuracy", CHANCE_ACC, "chance (10%)", "accuracy")
    fig.axes[0].set_ylim(0, 1)
    return fig


def _train_and_test_figure(train: Series, test: Series | None, what: str, chance: float, chance_label: str,
                           title: str):
    """Training values as a line, test values as points, chance level dotted."""
    fig = new_figure(7, 4)
    ax = fig.subplots()
    _plot(ax, train, f"training {what}")
    _plot(ax, test, f"test {what}", marker="o")
    ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label=chance_label)
    _finish(ax, title, what)
    return fig


def throughput_figure(images_per_sec: Series, data_wait: Series | None):
    fig = new_figure(7, 5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    _plot(top, images_per_sec, "all processes")
    top.set_ylim(bottom=0)
    _finish(top, "training throughput", "images/s")
    top.set_xlabel("")
    _plot(bottom, data_wait, "waiting for input")
    bottom.set_ylim(0, 1)
    _finish(bottom, "share of step time spent waiting for input", "fraction")
    return fig
