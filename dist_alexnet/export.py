"""`dist-alexnet export`: a trained model as a folder any Hugging Face user recognizes, optionally with an ONNX
graph checked against PyTorch, optionally pushed to the Hub.

    <out>/
      config.json        AlexNet's arguments (num_classes, in_channels, width, dropout: what from_pretrained
                         needs), the input it expects (size, normalization), class names, the run's metrics,
                         training config and source checkpoint, and the ONNX parity figures
      model.safetensors  the weights (the weight average with --ema-decay), metadata format "pt"
      README.md          the model card, with YAML front matter (library, task, data set, license, metrics)
      model.onnx         with --format onnx: uint8 images [batch, 28, 28] -> logits, preprocessing included

`AlexNet.from_pretrained(out)` loads it (huggingface_hub's PyTorchModelHubMixin), as does
`torch.hub.load(repo, "alexnet", source="local", weights=out)` (hubconf.py), predict and evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from huggingface_hub import HfApi
from safetensors import SafetensorError
from torch import nn

from dist_alexnet.datasets import CLASS_NAMES, MEAN, STD, load_sample
from dist_alexnet.errors import ConfigError, ExportError, first_line
from dist_alexnet.inference import TrainedModel, load_trained_model
from dist_alexnet.inputs import normalize_and_resize, resize_matrix
from dist_alexnet.model import count_parameters
from dist_alexnet.rundir import RunDir, read_metrics
from dist_alexnet.serving import (EXPORT_CARD, EXPORT_CONFIG, EXPORT_FILES, EXPORT_FORMAT, ONNX_FILE, onnx_session,
                                  softmax)

ONNX_OPSET = 18
PARITY_IMAGES = 256  # real test images (the shipped sample's test part) the ONNX graph is checked on
PARITY_TOLERANCE = 1e-3  # the largest logit difference accepted between ONNX Runtime and PyTorch


def export_model(checkpoint: str, out: str | os.PathLike, onnx: bool = False, log=print,
                 overwrite: bool = False) -> Path:
    """Write the export folder `out` (complete or not at all: it is built next to `out`, then renamed into
    place); returns it. An existing `out` must be empty, or with `overwrite` an earlier export."""
    trained = load_trained_model(checkpoint, log)
    out = Path(out)
    check_out(out, trained.path, overwrite)
    building = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    replaced = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(building, ignore_errors=True)
        config = export_config(trained)
        trained.model.save_pretrained(building, config=config)  # config.json, model.safetensors (format "pt")
        if onnx:
            config["onnx"] = export_onnx(trained, building / ONNX_FILE)
            (building / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (building / EXPORT_CARD).write_text(model_card(config))
        # safetensors writes its file for the owner alone; a model meant for sharing is readable as README.md is
        mode = (building / EXPORT_CARD).stat().st_mode & 0o777
        for file in building.iterdir():
            file.chmod(mode)
        if out.exists():  # checked above: empty, or an earlier export (--overwrite)
            os.rename(out, replaced)
        os.rename(building, out)
        shutil.rmtree(replaced, ignore_errors=True)
    except (OSError, SafetensorError) as err:  # (safetensors reports a full disk as its own error)
        shutil.rmtree(building, ignore_errors=True)
        if replaced.exists() and not out.exists():
            os.rename(replaced, out)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        raise ConfigError(f"cannot write the export into {out} ({reason}); free some space or choose another "
                          f"--out") from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return out


def check_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an --out whose contents the export would destroy (ConfigError naming what is in the way)."""
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        kind = "a link" if out.is_symlink() else "not a directory"
        raise ConfigError(f"--out {out} exists and is {kind}; choose another --out")
    source = source.resolve()
    if out.resolve() == source or out.resolve() in source.parents:
        raise ConfigError(f"--out {out} holds the checkpoint being exported ({source}); choose another --out")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; choose another --out, or add --overwrite to replace "
                          f"an earlier export there")
    # only a folder of an export's files (EXPORT_FILES) is replaced: no mistyped --out deletes a run or a checkpoint
    foreign = [name for name in entries if name not in EXPORT_FILES or not (out / name).is_file()]
    if foreign or not (out / EXPORT_CONFIG).is_file():
        what = (f"holds {foreign[0]!r}, which no export writes" if foreign else f"has no {EXPORT_CONFIG}")
        raise ConfigError(f"--out {out} is not an earlier export ({what}: a run directory, a checkpoint or other "
                          f"files); --overwrite only replaces an export; choose another --out")


def export_config(trained: TrainedModel) -> dict:
    """config.json: AlexNet's own arguments first (from_pretrained passes those), then what a user needs."""
    model = trained.model
    return {
        "num_classes": len(CLASS_NAMES), "in_channels": 1, "width": float(trained.config["model_width"]),
        "dropout": float(trained.config.get("dropout", 0.5)),
        "format": EXPORT_FORMAT,
        "architecture": "AlexNet",
        "parameters": count_parameters(model),
        "image_size": trained.image_size,
        "input": {
            "source": "grayscale 28x28 uint8, a light object on a dark background (as Fashion-MNIST)",
            "normalization": {"scale": "pixel / 255", "mean": MEAN, "std": STD},
            "resize": "bilinear, align_corners=False, from 28x28 to image_size x image_size, after normalizing",
        },
        "class_names": list(CLASS_NAMES),
        "metrics": training_metrics(trained),
        "source_checkpoint": str(trained.path.resolve()),
        "trainer_state": {k: trained.trainer_state.get(k) for k in ("step", "epoch", "test_acc", "world_size")
                          if k in trained.trainer_state},
        "training_config": trained.config,
    }


def training_metrics(trained: TrainedModel) -> dict:
    """The test accuracy at the checkpoint's step, and the run's final metrics.json when this checkpoint
    is the run's final one (an export carries its own)."""
    if trained.card:
        return trained.card.get("metrics", {})
    metrics = {"test_acc": trained.trainer_state.get("test_acc"), "step": trained.trainer_state.get("step")}
    run_metrics = read_metrics(RunDir(trained.path.parent.parent).metrics)  # the run of checkpoints/step_NNNNNN
    if run_metrics and run_metrics["steps"] == trained.trainer_state.get("step"):
        metrics.update({k: run_metrics[k] for k in ("test_acc", "test_loss", "test_samples", "train_loss",
                                                     "epochs") if k in run_metrics})
    return metrics


def model_card(config: dict) -> str:
    """README.md: YAML front matter (what the Hub indexes) and how to use the model."""
    metrics, training = config["metrics"], config["training_config"]
    accuracy = metrics.get("test_acc")
    front = {
        "library_name": "dist-alexnet",
        "pipeline_tag": "image-classification",
        "license": "mit",
        "datasets": ["fashion_mnist"],
        "metrics": ["accuracy"],
        "tags": ["alexnet", "fashion-mnist", "image-classification", "pytorch", "model_hub_mixin",
                 "pytorch_model_hub_mixin"],
    }
    if accuracy is not None:
        front["model-index"] = [{"name": f"dist-alexnet AlexNet (width {config['width']:g})", "results": [{
            "task": {"type": "image-classification", "name": "Image classification"},
            "dataset": {"type": "fashion_mnist", "name": "Fashion-MNIST" if training.get("dataset") == "fashion-mnist"
                        else f"Fashion-MNIST ({training.get('dataset')})", "split": "test"},
            "metrics": [{"type": "accuracy", "value": accuracy}]}]}]
    onnx = config.get("onnx")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             "# AlexNet for Fashion-MNIST (dist-alexnet)", "",
             f"AlexNet at width {config['width']:g} ({config['parameters']:,} parameters), trained by dist-alexnet "
             f"on `{training.get('dataset')}` for {metrics.get('epochs', config['trainer_state'].get('epoch'))} "
             f"epoch(s) at {config['image_size']}x{config['image_size']} px.", "",
             f"- test accuracy: **{accuracy:.4f}**" if accuracy is not None else "- test accuracy: not measured",
             f"- classes: {', '.join(config['class_names'])}",
             "- input: grayscale 28x28 uint8, a light object on a dark background; scaled to [0, 1], normalized "
             f"with mean {MEAN} and std {STD}, then resized to {config['image_size']}x{config['image_size']} "
             "(bilinear, align_corners=False)",
             "", "## Use", "", "```python", "from dist_alexnet.model import AlexNet", "",
             'model = AlexNet.from_pretrained("path/to/this/folder").eval()', "```", "",
             'or `torch.hub.load("path/to/dist-alexnet", "alexnet", source="local", '
             'weights="path/to/this/folder")`, or `dist-alexnet predict --checkpoint path/to/this/folder image.png`.',
             ""]
    if onnx:
        lines += ["## ONNX", "",
                  f"`{ONNX_FILE}` (opset {onnx['opset']}) takes the uint8 images [batch, 28, 28] themselves: the "
                  "normalization and the resize are part of the graph. Checked against PyTorch at export on "
                  f"{onnx['images']} real test images: largest logit difference {onnx['max_abs_logit_difference']:.2e}"
                  f", top-1 agreement {onnx['argmax_agreement']:.0%}. `dist-alexnet predict --onnx --checkpoint "
                  "path/to/this/folder image.png` runs it with ONNX Runtime alone.", ""]
    lines += ["## Training", "", "```yaml", yaml.safe_dump(training, sort_keys=False).rstrip(), "```", "",
              f"Source checkpoint: `{config['source_checkpoint']}`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ONNX

class ServingModel(nn.Module):
    """uint8 images [B, 28, 28] -> logits: the training pipeline's normalization and resize, then the model.
    What is exported to ONNX, so that the graph takes what a camera or a file gives."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model
        self.register_buffer("rows", resize_matrix(28, image_size))
        self.register_buffer("columns", resize_matrix(28, image_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize_and_resize(images, self.rows, self.columns))


def export_onnx(trained: TrainedModel, path: Path) -> dict:
    """model.onnx with a dynamic batch axis, and the parity check: ONNX Runtime's logits against PyTorch's on
    real test images. A failed check is an ExportError; the figures go into config.json and the card."""
    try:
        # the [onnx] extra, imported only for --format onnx: torch's exporter needs onnx (and onnxscript)
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"export --format onnx needs the [onnx] extra ({err.name} is missing): "
                          f"pip install 'dist-alexnet[onnx]'") from None
    serving = ServingModel(trained.model.eval(), trained.image_size).eval()
    example = torch.zeros(2, 28, 28, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(serving, (example,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True, verbose=False,
                      external_data=False)
    return {"file": ONNX_FILE, "opset": ONNX_OPSET, **check_onnx(serving, path)}


def check_onnx(serving: nn.Module, path: Path) -> dict:
    """Run the first PARITY_IMAGES of the shipped sample's test part through ONNX Runtime and PyTorch; raise
    ExportError unless every top-1 class agrees and no logit differs by more than PARITY_TOLERANCE."""
    images = load_sample()[1].images[:PARITY_IMAGES]
    with torch.no_grad():
        expected = serving(images).numpy()
    try:
        found = onnx_session(path.parent).run(None, {"images": images.numpy()})[0]
    except ConfigError as err:
        raise ExportError(f"the ONNX export does not load: {err}") from None
    except Exception as err:  # ONNX Runtime's errors at run time (a graph it cannot execute)
        raise ExportError(f"ONNX Runtime cannot run {path} ({first_line(err, 200)})") from None
    difference = float(np.abs(found - expected).max())
    agreement = float((found.argmax(1) == expected.argmax(1)).mean())
    probability_difference = float(np.abs(softmax(found) - softmax(expected)).max())
    if difference > PARITY_TOLERANCE or agreement < 1:
        raise ExportError(f"the ONNX export does not match the model: on {len(images)} test images the logits differ "
                          f"by up to {difference:.3g} (allowed {PARITY_TOLERANCE:g}) and {agreement:.1%} of the "
                          f"top-1 classes agree; {path} is not to be used")
    return {"images": len(images), "max_abs_logit_difference": difference,
            "max_abs_probability_difference": probability_difference, "argmax_agreement": agreement,
            "tolerance": PARITY_TOLERANCE}


# ----------------------------------------------------------------------------- the Hub

def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload an export folder to a Hugging Face model repository; one clear line when that cannot happen."""
    try:
        HfApi().create_repo(repo_id, exist_ok=True)
        return HfApi().upload_folder(folder_path=str(folder), repo_id=repo_id,
                                     commit_message="dist-alexnet export").commit_url
    except Exception as err:  # offline, no token, no such organization, the network: huggingface_hub's own types
        raise ConfigError(f"could not push {folder} to the Hub as {repo_id} ({type(err).__name__}: "
                          f"{first_line(err)}); the export itself is complete: push it later with "
                          f"`huggingface-cli upload {repo_id} {folder}` once online and logged in "
                          f"(`huggingface-cli login`)") from None
