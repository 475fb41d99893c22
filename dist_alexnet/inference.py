"""After training: load a trained model, evaluate it exactly, predict the class of image files.

Each accepts a training checkpoint (checkpoints/step_NNNNNN), a run directory (its best checkpoint, else its
newest) or an export: the Hugging Face-style folder `export` writes (config.json, model.safetensors,
README.md; dist_alexnet/export.py), or the model_card.json folder of dist-alexnet 0.1. Loading runs no code
from the files: safetensors for the weights, JSON for the rest.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_alexnet.checkpoint import (TRAINER_STATE, CheckpointError, best_checkpoint, check_weights, checkpoint_file,
                                     list_checkpoints, load_model_state, read_trainer_state)
from dist_alexnet.config import TrainConfig
from dist_alexnet.device import default_device, use_cuda
from dist_alexnet.datasets import CLASS_NAMES, load_data_on_every_rank
from dist_alexnet.distributed import make_accelerator
from dist_alexnet.inputs import make_loader, to_model_input
from dist_alexnet.schedule import BatchPlan
from dist_alexnet.steps import evaluate
from dist_alexnet.model import AlexNet
from dist_alexnet.rundir import RunDir
from dist_alexnet.serving import (EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_WEIGHTS, OLD_EXPORT_FORMAT, OLD_MODEL_CARD,
                                  Classifier)



# ----------------------------------------------------------------------------- loading a model

@dataclass
class TrainedModel:
    model: AlexNet
    path: Path          # the checkpoint or export directory the weights came from
    image_size: int     # the side the model was trained on
    config: dict        # the training run's config (an export carries it in its card)
    trainer_state: dict  # step, epoch and test accuracy at that step (an export keeps them in its card)
    card: dict          # the export's model card ({} for a training checkpoint)


def resolve_model_dir(path: str | os.PathLike, log=print) -> Path:
    """A checkpoint or export directory; a run directory means its best checkpoint, else its newest."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":  # a checkpoint's or an export's weights: their folder
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoints/step_NNNNNN directory, "
                              f"a run directory or an export directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint; give a checkpoints/step_NNNNNN directory, "
                              f"a run directory or an export directory")
    if RunDir(path).checkpoints.is_dir():
        best = best_checkpoint(path)
        chosen = best or next(reversed(list_checkpoints(path)), None)
        if chosen is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint yet")
        log(f"using {chosen} ({'best by test accuracy' if best else 'newest'})")
        return chosen
    return path


def load_trained_model(path: str | os.PathLike, log=print) -> TrainedModel:
    """The model in eval mode on the CPU, with what it was trained on; CheckpointError names a bad file."""
    folder = resolve_model_dir(path, log)
    checkpoint = (folder / TRAINER_STATE).exists()
    if checkpoint:
        state, card = read_trainer_state(folder), {}
        config = state.get("config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder / TRAINER_STATE} holds no training config; "
                                  f"is it a dist-alexnet checkpoint?")
    elif (folder / EXPORT_CONFIG).exists() or (folder / OLD_MODEL_CARD).exists():
        card = read_export_card(folder)
        state, config = card.get("trainer_state", {}), card["training_config"]
    else:
        raise CheckpointError(f"{folder} is not a dist-alexnet checkpoint (no {TRAINER_STATE}) nor an export "
                              f"(no {EXPORT_CONFIG})")
    try:
        width, image_size = float(config["model_width"]), int(config["image_size"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{folder}: the training config lacks model_width/image_size; "
                              f"is it a dist-alexnet checkpoint?") from None
    model = AlexNet(width=width)
    # a run with --ema-decay evaluated (and exports) the moving average of its weights
    weights_file = folder / EXPORT_WEIGHTS
    if checkpoint:
        ema = checkpoint_file(folder, "ema")
        weights_file = ema if ema.exists() else checkpoint_file(folder, "model")
    weights = load_model_state(weights_file)
    check_weights(weights, {name: tuple(t.shape) for name, t in model.state_dict().items()}, weights_file,
                  f"dist-alexnet's AlexNet at width {width:g}")
    model.load_state_dict(weights)
    return TrainedModel(model.eval(), folder, image_size, config, state, card)


def read_export_card(folder: Path) -> dict:
    """What an export says about its model: config.json (this version) or model_card.json (0.1)."""
    path, expected = ((folder / EXPORT_CONFIG, EXPORT_FORMAT) if (folder / EXPORT_CONFIG).exists()
                      else (folder / OLD_MODEL_CARD, OLD_EXPORT_FORMAT))
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not valid JSON)") from None
    if not isinstance(card, dict) or card.get("format") != expected or "training_config" not in card:
        raise CheckpointError(f"{path} is not a dist-alexnet export's (format {expected})")
    return card


MAX_WIDTH = 4.0  # as train's --model-width: 4x AlexNet is 0.9 billion parameters (3.7 GB of float32)


def check_model_arguments(arguments: dict, source: str) -> None:
    """AlexNet's arguments (num_classes, in_channels, width, dropout; from an export's config.json or a caller)
    checked before the model is built: a width of 40 would allocate 3.9 GB first. CheckpointError names `source`."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    def real(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    problems = []
    for name in ("num_classes", "in_channels"):
        if name in arguments and not whole(arguments[name]):
            problems.append(f"{name} {arguments[name]!r} is not a whole number >= 1")
    width = arguments.get("width", 1.0)
    if not (real(width) and 0 < width <= MAX_WIDTH):
        problems.append(f"width {width!r} is not in (0, {MAX_WIDTH:g}]")
    dropout = arguments.get("dropout", 0.5)
    if not (real(dropout) and 0 <= dropout < 1):
        problems.append(f"dropout {dropout!r} is not in [0, 1)")
    unknown = sorted(set(arguments) - {"num_classes", "in_channels", "width", "dropout"})
    if unknown:
        problems.append(f"unknown argument(s) {', '.join(unknown)}")
    if problems:
        raise CheckpointError(f"{source}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- evaluate

def evaluation_config(trained: TrainedModel, overrides: dict) -> TrainConfig:
    """The training run's config with the data options given on the command line put over it."""
    known = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in trained.config.items() if k in known}
    # evaluation batches are per process: a run's --global-batch-size becomes the batch (unless one is given)
    values["batch_size"] = values.get("batch_size") or values.get("global_batch_size")
    values.update(overrides, output_dir=None, resume="none", global_batch_size=None)
    if "download" not in overrides:  # evaluate writes nothing unless asked to: a card's data_dir may point anywhere
        values["download"] = False
    if "mixed_precision" not in overrides and values.get("mixed_precision") == "fp16" and not use_cuda():
        values["mixed_precision"] = "no"  # a GPU run's checkpoint evaluated on a CPU
    return TrainConfig(**values).validate()


def evaluate_checkpoint(checkpoint: str, split: str, overrides: dict) -> dict | None:
    """Exact accuracy and loss of a checkpoint on a split, in one process or many (`accelerate launch`).
    Returns the results on rank 0, None on the other ranks."""
    trained = load_trained_model(checkpoint, log=lambda message: print(message, file=sys.stderr))
    cfg = evaluation_config(trained, overrides)
    accelerator = make_accelerator(cfg)
    train_split, test_split = load_data_on_every_rank(cfg, accelerator, write=False)
    data = test_split if split == "test" else train_split
    loader, _ = make_loader(data, cfg, BatchPlan.of(cfg, accelerator.num_processes), train=False)
    # evaluation_mode: autocast as in training, but no DDP wrapper (nothing to synchronize).
    model = accelerator.prepare_model(trained.model, evaluation_mode=True)
    loader = accelerator.prepare_data_loader(loader)
    results = evaluate(model, loader, accelerator, trained.image_size)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    return {
        "checkpoint": str(trained.path),
        "step": trained.trainer_state.get("step"),
        "dataset": cfg.dataset,
        "split": split,  # the test_* figures below are of this split
        "test_acc": results["test_acc"],
        "test_loss": results["test_loss"],
        "test_correct": results["test_correct"],
        "test_samples": results["test_samples"],
        "per_class_acc": dict(zip(CLASS_NAMES, results["per_class_acc"])),
        "confusion_matrix": results["confusion_matrix"].tolist(),
        "world_size": accelerator.num_processes,
    }


def format_evaluation(results: dict) -> str:
    step = f" (step {results['step']})" if results["step"] is not None else ""
    lines = [f"{results['checkpoint']}{step} on the {results['dataset']} {results['split']} split, "
             f"{results['world_size']} process(es)",
             f"accuracy {results['test_acc']:.4f} ({results['test_correct']}/{results['test_samples']}) | "
             f"loss {results['test_loss']:.4f}", "", "per-class accuracy:"]
    confusion = results["confusion_matrix"]
    for k, (name, acc) in enumerate(results["per_class_acc"].items()):
        lines.append(f"  {name:<12} {acc:.4f}  ({confusion[k][k]}/{sum(confusion[k])})")
    lines += ["", "confusion matrix (rows: true class, columns: predicted):",
              " " * 13 + "".join(f"{name[:6]:>7}" for name in CLASS_NAMES)]
    for name, row in zip(CLASS_NAMES, confusion):
        lines.append(f"  {name:<11}" + "".join(f"{n:>7}" for n in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- predict

def torch_classifier(trained: TrainedModel) -> Classifier:
    """predict's classifier of a trained model, on the GPU when there is one."""
    device = default_device()
    model = trained.model.to(device)

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(to_model_input(torch.from_numpy(images).to(device), trained.image_size)).float().cpu().numpy()

    return Classifier(logits, list(CLASS_NAMES), trained.path)
