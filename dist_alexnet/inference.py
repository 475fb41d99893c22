"""After training: evaluate a checkpoint, predict the class of image files, export the model.

Each accepts a training checkpoint (checkpoints/step_NNNNNN), an export (model.safetensors next to a
model_card.json, written by `export`) or a run directory (its best checkpoint, else its newest).
Loading runs no code from the files: safetensors for the weights, JSON for the rest.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_alexnet.checkpoint import (CheckpointError, best_checkpoint, check_weights, list_checkpoints,
                                     load_model_state, read_trainer_state)
from dist_alexnet.config import ConfigError, TrainConfig, cuda_usable
from dist_alexnet.datasets import CLASS_NAMES, MEAN, STD
from dist_alexnet.inputs import to_model_input
from dist_alexnet.model import AlexNet, count_parameters

MODEL_CARD = "model_card.json"
EXPORT_FORMAT = "dist-alexnet-export/1"
# predict's limit: a picture of a garment needs far fewer pixels (and a 12000x12000 PNG of 140 KB takes 3.5 GB)
MAX_PIXELS = 40_000_000
# Named in predict's message about a directory without images (PIL reads many more).
COMMON_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image file that cannot be read; predict reports it and goes on with the other files."""


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
    if path.is_file() and path.name == "model.safetensors":
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoints/step_NNNNNN directory, "
                              f"a run directory or an export directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint; give a checkpoints/step_NNNNNN directory, "
                              f"a run directory or an export directory")
    if (path / "checkpoints").is_dir():
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
    if (folder / "trainer_state.json").exists():
        state, card = read_trainer_state(folder), {}
        config = state.get("config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder / 'trainer_state.json'} holds no training config; "
                                  f"is it a dist-alexnet checkpoint?")
    elif (folder / MODEL_CARD).exists():
        card = read_model_card(folder / MODEL_CARD)
        state, config = card.get("trainer_state", {}), card["training_config"]
    else:
        raise CheckpointError(f"{folder} is not a dist-alexnet checkpoint (no trainer_state.json) nor an export "
                              f"(no {MODEL_CARD})")
    try:
        width, image_size = float(config["model_width"]), int(config["image_size"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{folder}: the training config lacks model_width/image_size; "
                              f"is it a dist-alexnet checkpoint?") from None
    model = AlexNet(width=width)
    # a run with --ema-decay evaluated (and exports) the moving average of its weights
    weights_file = folder / "ema.safetensors" if (folder / "ema.safetensors").exists() else folder / "model.safetensors"
    weights = load_model_state(weights_file)
    check_weights(weights, {name: tuple(t.shape) for name, t in model.state_dict().items()}, weights_file,
                  f"dist-alexnet's AlexNet at width {width:g}")
    model.load_state_dict(weights)
    return TrainedModel(model.eval(), folder, image_size, config, state, card)


def read_model_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not valid JSON)") from None
    if not isinstance(card, dict) or card.get("format") != EXPORT_FORMAT or "training_config" not in card:
        raise CheckpointError(f"{path} is not a dist-alexnet model card (format {EXPORT_FORMAT})")
    return card


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
    if "mixed_precision" not in overrides and values.get("mixed_precision") == "fp16" and not cuda_usable():
        values["mixed_precision"] = "no"  # a GPU run's checkpoint evaluated on a CPU
    return TrainConfig(**values).validate()


def evaluate_checkpoint(checkpoint: str, split: str, overrides: dict) -> dict | None:
    """Exact accuracy and loss of a checkpoint on a split, in one process or many (`accelerate launch`).
    Returns the results on rank 0, None on the other ranks."""
    from dist_alexnet.distributed import load_data_on_every_rank, make_accelerator
    from dist_alexnet.inputs import make_loader
    from dist_alexnet.steps import evaluate

    trained = load_trained_model(checkpoint, log=lambda message: print(message, file=sys.stderr))
    cfg = evaluation_config(trained, overrides)
    accelerator = make_accelerator(cfg)
    train_split, test_split = load_data_on_every_rank(cfg, accelerator, write=False)
    data = test_split if split == "test" else train_split
    loader, _ = make_loader(data, cfg, train=False)
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

def image_files(arguments: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to predict (a directory means the image files in it, by name) and the arguments that
    are not usable, each with the reason."""
    from PIL import Image

    extensions = set(Image.registered_extensions())
    files, problems = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                problems.append((argument, f"directory {path} holds no image files (looked for "
                                           f"{', '.join(sorted(COMMON_EXTENSIONS))}, ...)"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append((argument, f"{path} does not exist"))
    return files, problems


def read_image(path: Path, invert: bool = False) -> torch.Tensor:
    """Any PIL-readable image (any size; RGB, RGBA, palette, grayscale, 16-bit...) -> uint8 [28, 28] the way
    Fashion-MNIST stores an item: grayscale, a light object on a dark background, the whole picture fitted
    into 28x28 (aspect ratio kept, the rest filled with background). Transparent pixels are background.
    `invert` turns a photo of a dark object on light ground into that polarity."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL's own, looser limit warns; ours below refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only: the size is known before the pixels are decoded
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{path}: {image.width}x{image.height} pixels is more than the "
                                 f"{MAX_PIXELS / 1e6:g} megapixels predict reads; scale it down first; skipped")
            image.load()
            gray = grayscale(image, background=1.0 if invert else 0.0)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # beyond twice PIL's limit it refuses on its own
        raise ImageError(f"{path}: more than the {MAX_PIXELS / 1e6:g} megapixels predict reads ({err}); scale it "
                         f"down first; skipped") from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{path}: cannot read it as an image ({reason}); skipped") from None
    if invert:
        gray = 1 - gray
    height, width = gray.shape
    scale = 28 / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size != (height, width):
        gray = F.interpolate(gray[None, None], size=size, mode="bilinear", antialias=scale < 1,
                             align_corners=False)[0, 0]
    top, left = (28 - size[0]) // 2, (28 - size[1]) // 2
    fitted = torch.zeros(28, 28)
    fitted[top:top + size[0], left:left + size[1]] = gray
    return (fitted * 255).round().clamp(0, 255).to(torch.uint8)


def grayscale(image, background: float) -> torch.Tensor:
    """A PIL image -> float [H, W] in [0, 1]; transparency is blended onto `background`."""
    import numpy as np

    if image.mode.startswith("I;16"):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535)
    if image.mode in ("I", "F"):  # 32-bit integer or float pixels: scale by the range they use
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if image.mode == "F" and values.max() <= 1 else 255.0 if values.max() <= 255 else 65535.0
        return torch.from_numpy(values / top).clamp(0, 1)
    luminance, alpha = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32).transpose(2, 0, 1) / 255
    return torch.from_numpy(luminance * alpha + background * (1 - alpha))


@torch.no_grad()
def predict(trained: TrainedModel, files: list[Path], invert: bool = False, batch_size: int = 256,
            top_k: int = 3) -> tuple[list[dict], list[tuple[str, str]]]:
    """Class probabilities of each readable file, and (file, reason) for the others."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = trained.model.to(device)
    predictions, problems = [], []
    readable = []
    for path in files:
        try:
            readable.append((path, read_image(path, invert)))
        except ImageError as err:
            problems.append((str(path), str(err)))
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        images = torch.stack([image for _, image in chunk]).to(device)
        probabilities = model(to_model_input(images, trained.image_size)).float().softmax(1).cpu()
        for (path, _), p in zip(chunk, probabilities):
            best = p.topk(min(top_k, len(CLASS_NAMES)))
            predictions.append({
                "file": str(path),
                "class": CLASS_NAMES[int(best.indices[0])],
                "class_index": int(best.indices[0]),
                "probability": float(best.values[0]),
                "top_k": [{"class": CLASS_NAMES[int(i)], "class_index": int(i), "probability": float(v)}
                          for v, i in zip(best.values, best.indices)],
                "probabilities": p.tolist(),
            })
    return predictions, problems


def format_prediction(prediction: dict) -> str:
    ranked = " | ".join(f"{t['class']} {t['probability']:.3f}" for t in prediction["top_k"])
    return f"{prediction['file']}: {ranked}"


# ----------------------------------------------------------------------------- export

def export_model(checkpoint: str, out: str | os.PathLike, log=print) -> Path:
    """Weights-only model.safetensors plus model_card.json in `out`; returns the card's path."""
    from safetensors.torch import save_file

    trained = load_trained_model(checkpoint, log)
    out = Path(out)
    card = {
        "format": EXPORT_FORMAT,
        "architecture": {
            "name": "AlexNet", "module": "dist_alexnet.model.AlexNet", "width": float(trained.config["model_width"]),
            "in_channels": 1, "num_classes": len(CLASS_NAMES), "parameters": count_parameters(trained.model),
        },
        "input": {
            "image_size": trained.image_size,
            "source": "grayscale 28x28 uint8, a light object on a dark background (as Fashion-MNIST)",
            "resize": "bilinear, align_corners=False, from 28x28 to image_size x image_size",
            "normalization": {"scale": "pixel / 255", "mean": MEAN, "std": STD},
        },
        "class_names": list(CLASS_NAMES),
        "metrics": training_metrics(trained),
        "source_checkpoint": str(trained.path.resolve()),
        "trainer_state": {k: trained.trainer_state.get(k) for k in ("step", "epoch", "test_acc", "world_size")
                          if k in trained.trainer_state},
        "training_config": trained.config,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous() for k, v in trained.model.state_dict().items()}
        save_file(weights, out / ".model.safetensors.tmp", metadata={"format": EXPORT_FORMAT})
        os.replace(out / ".model.safetensors.tmp", out / "model.safetensors")
        (out / f".{MODEL_CARD}.tmp").write_text(json.dumps(card, indent=2) + "\n")
        os.replace(out / f".{MODEL_CARD}.tmp", out / MODEL_CARD)
    except OSError as err:
        raise ConfigError(f"cannot write the export into {out} ({err.strerror or err}); choose another --out") from None
    return out / MODEL_CARD


def training_metrics(trained: TrainedModel) -> dict:
    """The test accuracy at the checkpoint's step, and the run's final metrics.json when this checkpoint
    is the run's final one."""
    if trained.card:
        return trained.card.get("metrics", {})
    metrics = {"test_acc": trained.trainer_state.get("test_acc"), "step": trained.trainer_state.get("step")}
    final = trained.path.parent.parent / "metrics.json"
    try:
        run_metrics = json.loads(final.read_text())
    except (OSError, ValueError):
        return metrics
    if run_metrics.get("steps") == trained.trainer_state.get("step"):
        metrics.update({k: run_metrics[k] for k in ("test_acc", "test_loss", "test_samples", "train_loss",
                                                     "epochs") if k in run_metrics})
    return metrics
