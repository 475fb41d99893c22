"""What predicting needs that is not the model: image files turned into what the model was trained on, the
predictions as records, and an ONNX export run by ONNX Runtime. None of it imports torch, so that
`dist-alexnet predict --onnx` serves an exported model with ONNX Runtime and numpy alone.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE
from PIL import Image, ImageOps

from dist_alexnet.errors import ConfigError, first_line

# predict's limit: a picture of a garment needs far fewer pixels (and a 12000x12000 PNG of 140 KB takes 3.5 GB)
MAX_PIXELS = 40_000_000
# Named in predict's message about a directory without images (PIL reads many more).
COMMON_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image file that cannot be read; predict reports it and goes on with the other files."""


def image_files(arguments: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to predict (a directory means the image files in it, by name) and the arguments that
    are not usable, each with the reason."""
    extensions = set(Image.registered_extensions())
    files, problems = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            named = sorted(p for p in path.iterdir() if p.suffix.lower() in extensions)
            found = [p for p in named if p.is_file()]
            # an image's name on a link to nowhere, a FIFO or a device: meant as an input, so named, never opened
            problems += [(str(p), not_a_file(p)) for p in named if not p.is_file() and not p.is_dir()]
            if not named:
                problems.append((argument, f"directory {path} holds no image files (looked for "
                                           f"{', '.join(sorted(COMMON_EXTENSIONS))}, ...)"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append((argument, not_a_file(path)))
    return files, problems


def not_a_file(path: Path) -> str:
    """Why `path` (neither a regular file nor a directory) is not read: predict's message about it."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a link to nowhere ({os.readlink(path)} does not exist); skipped"
    if path.exists():  # reading a FIFO would wait for a writer forever
        return f"{path} is not a regular file (a FIFO, socket or device); skipped"
    return f"{path} does not exist"


def read_image(path: Path, invert: bool = False) -> np.ndarray:
    """Any PIL-readable image (any size; RGB, RGBA, palette, grayscale, 16-bit...) -> uint8 [28, 28] the way
    Fashion-MNIST stores an item: grayscale, a light object on a dark background, the whole picture fitted
    into 28x28 (aspect ratio kept, bilinear, antialiased when it shrinks; the rest filled with background).
    Transparent pixels are background. `invert` turns a photo of a dark object on light ground into that
    polarity."""
    try:
        with warnings.catch_warnings():  # PIL's own, looser limit warns; ours below refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only: the size is known before the pixels are decoded
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{path}: {image.width}x{image.height} pixels is more than the "
                                 f"{MAX_PIXELS / 1e6:g} megapixels predict reads; scale it down first; skipped")
            image.load()
            # a camera's EXIF orientation: the upright picture, as a viewer shows it, not the sensor's rows
            gray = grayscale(ImageOps.exif_transpose(image), background=1.0 if invert else 0.0)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # beyond twice PIL's limit it refuses on its own
        raise ImageError(f"{path}: more than the {MAX_PIXELS / 1e6:g} megapixels predict reads ({err}); scale it "
                         f"down first; skipped") from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageError(f"{path}: cannot read it as an image ({first_line(err, None)}); skipped") from None
    if invert:
        gray = 1 - gray
    height, width = gray.shape
    scale = 28 / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size != (height, width):  # PIL's bilinear filter widens with the scale when it shrinks: antialiased
        gray = np.asarray(Image.fromarray(gray, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR))
    top, left = (28 - size[0]) // 2, (28 - size[1]) // 2
    fitted = np.zeros((28, 28), dtype=np.float32)
    fitted[top:top + size[0], left:left + size[1]] = gray
    return np.clip(np.round(fitted * 255), 0, 255).astype(np.uint8)


def grayscale(image, background: float) -> np.ndarray:
    """A PIL image -> float32 [H, W] in [0, 1]; transparency is blended onto `background`."""
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535
    if image.mode in ("I", "F"):  # 32-bit integer or float pixels: scale by the range they use
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if image.mode == "F" and values.max() <= 1 else 255.0 if values.max() <= 255 else 65535.0
        return np.clip(values / top, 0, 1)
    luminance, alpha = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32).transpose(2, 0, 1) / 255
    return luminance * alpha + background * (1 - alpha)


def read_images(files: list[Path], invert: bool) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[str, str]]]:
    """(file, uint8 [28, 28]) of each readable file, and (file, reason) for the others."""
    readable, problems = [], []
    for path in files:
        try:
            readable.append((path, read_image(path, invert)))
        except ImageError as err:
            problems.append((str(path), str(err)))
    return readable, problems


def prediction(path: Path, probabilities: np.ndarray, class_names: list[str], top_k: int) -> dict:
    """One file's prediction as predict prints it (--json): the best class and the top k, all probabilities."""
    order = np.argsort(-probabilities, kind="stable")[:min(top_k, len(class_names))]
    best = int(order[0])
    return {
        "file": str(path),
        "class": class_names[best],
        "class_index": best,
        "probability": float(probabilities[best]),
        "top_k": [{"class": class_names[int(i)], "class_index": int(i), "probability": float(probabilities[i])}
                  for i in order],
        "probabilities": [float(p) for p in probabilities],
    }


def format_prediction(record: dict) -> str:
    ranked = " | ".join(f"{t['class']} {t['probability']:.3f}" for t in record["top_k"])
    return f"{record['file']}: {ranked}"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- an export's files

# The folder `export` writes and evaluate/predict read: Hugging Face's layout (config.json, the weights under
# huggingface_hub's name, a README.md model card), model.onnx with --format onnx; model_card.json was 0.1's card.
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = SAFETENSORS_SINGLE_FILE
EXPORT_CARD = "README.md"
ONNX_FILE = "model.onnx"
OLD_MODEL_CARD = "model_card.json"
EXPORT_FILES = (EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD, ONNX_FILE, OLD_MODEL_CARD)
EXPORT_FORMAT, OLD_EXPORT_FORMAT = "dist-alexnet-export/2", "dist-alexnet-export/1"  # config.json's "format"


# ----------------------------------------------------------------------------- ONNX Runtime

def onnx_session(folder: Path):
    """An ONNX Runtime session of an export's model.onnx (its input: uint8 images [batch, 28, 28])."""
    try:
        import onnxruntime  # the [onnx] extra, imported only for predict --onnx
    except ImportError:
        raise ConfigError("predict --onnx needs ONNX Runtime: pip install 'dist-alexnet[onnx]'") from None
    path = Path(folder) / ONNX_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: give an export made with `export --format onnx`")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime reports a damaged or foreign file as its own exception types
        raise ConfigError(f"{path} is not a model ONNX Runtime can load ({first_line(err, 200)})") from None
    check_onnx_signature(session, path)
    return session


def check_onnx_signature(session, path: Path, classes: int | None = None) -> None:
    """Refuse a graph that is not an export's: one input `images`, uint8 [batch, 28, 28]; one output of
    [batch, `classes`] logits (ConfigError naming what differs). A dimension the graph leaves open passes."""
    def fits(shape, expected) -> bool:
        return len(shape) == len(expected) and all(not isinstance(d, int) or e is None or d == e
                                                    for d, e in zip(shape, expected))

    inputs, outputs = session.get_inputs(), session.get_outputs()
    fix = "export the checkpoint again with `dist-alexnet export --format onnx`"
    if len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)" \
            or not fits(inputs[0].shape, (None, 28, 28)):
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ConfigError(f"{path} takes {found or 'no input'}, not an export's one input images tensor(uint8) "
                          f"[batch, 28, 28]; {fix}")
    if len(outputs) != 1 or not fits(outputs[0].shape, (None, classes)):
        found = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        raise ConfigError(f"{path} gives {found or 'no output'}, not one output of [batch, "
                          f"{classes if classes else 'classes'}] logits; {fix}")


def export_class_names(folder: Path) -> list[str]:
    """The class names an export's config.json lists (ConfigError when it has none)."""
    path = folder / EXPORT_CONFIG
    try:
        names = json.loads(path.read_text())["class_names"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} does not list the export's class names ({first_line(err, 200)}); give a folder "
                          f"made by `dist-alexnet export --format onnx`") from None
    if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
        raise ConfigError(f"{path}: class_names is not a list of names; give a folder made by `dist-alexnet export`")
    return names


def onnx_classifier(folder: Path) -> Classifier:
    """An export's model.onnx on ONNX Runtime (`folder`: the export, or its model.onnx itself): the normalization
    and the resize are in the graph, so its input is the 28x28 uint8 image itself."""
    if Path(folder).name == ONNX_FILE and Path(folder).is_file():
        folder = Path(folder).parent
    session = onnx_session(folder)
    class_names = export_class_names(Path(folder))
    check_onnx_signature(session, Path(folder) / ONNX_FILE, len(class_names))
    return Classifier(lambda images: session.run(None, {"images": images})[0], class_names, Path(folder))


# ----------------------------------------------------------------------------- predicting

@dataclass(frozen=True)
class Classifier:
    """What predict runs, from PyTorch (inference.torch_classifier) or ONNX Runtime (onnx_classifier)."""
    logits: Callable[[np.ndarray], np.ndarray]  # uint8 images [batch, 28, 28] -> float logits [batch, classes]
    class_names: list[str]
    source: Path  # the checkpoint or export it was loaded from


def predict(classifier: Classifier, files: list[Path], invert: bool = False, batch_size: int = 256,
            top_k: int = 3) -> tuple[list[dict], list[tuple[str, str]]]:
    """Class probabilities of each readable file, and (file, reason) for the others."""
    readable, problems = read_images(files, invert)
    records = []
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        probabilities = softmax(classifier.logits(np.stack([image for _, image in chunk])))
        records += [prediction(path, p, classifier.class_names, top_k) for (path, _), p in zip(chunk, probabilities)]
    return records, problems
