"""AlexNet for 1-channel images, as in the reference tutorial (d2l's AlexNet for Fashion-MNIST), and the
trainer's way of building it for a device."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE
from safetensors.torch import save_file
from torch import nn


class AlexNet(nn.Module, PyTorchModelHubMixin, library_name="dist-alexnet", pipeline_tag="image-classification",
              tags=["alexnet", "fashion-mnist", "image-classification"]):
    """conv 96-256-384-384-256 with ReLU, max-pool 3/2 after conv 1, 2 and 5, then FC 9216-4096-4096-10.

    At image size 224 the feature map is 96x55x55 after conv 1 and 256x6x6 before the classifier.
    Adaptive average pooling to 6x6 lets any image size >= 64 run with the same parameter count
    (at 224 it is the identity). With the defaults: 58,299,082 parameters.

    `width` scales every channel count and hidden width; 1.0 is the real model, small values give
    the same architecture at a size the test suite can train in seconds on a CPU.

    Hugging Face's PyTorchModelHubMixin adds save_pretrained / from_pretrained / push_to_hub: an export
    (`dist-alexnet export`) loads with `AlexNet.from_pretrained(folder)`.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        c1, c2, c3, c4, c5, hidden = channel_widths(width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c5 * 6 * 6, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))

    def _save_pretrained(self, save_directory: Path) -> None:
        """save_pretrained's weights file, with the metadata transformers-style loaders check (format "pt")."""
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(weights, str(Path(save_directory) / SAFETENSORS_SINGLE_FILE), metadata={"format": "pt"})


def channel_widths(width: float) -> tuple[int, ...]:
    """The five convolutions' channels and the hidden width of AlexNet at `width`."""
    return tuple(max(1, round(c * width)) for c in (96, 256, 384, 384, 256, 4096))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg, device: torch.device | str = "cpu") -> AlexNet:
    """The trainer's AlexNet for a TrainConfig, on `device`, with CUDA's fast paths switched on there."""
    device = torch.device(device)
    model = AlexNet(num_classes=10, in_channels=1, width=cfg.model_width, dropout=cfg.dropout)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN time its algorithms once per shape
        # NHWC activations let cuDNN use its fastest tensor-core convolutions (the 1-channel input needs no change).
        model = model.to(device, memory_format=torch.channels_last)
    else:
        model = model.to(device)
    if cfg.compile:
        model.compile()  # in place: state_dict keys, checkpoints and DDP wrapping stay as without it
    return model
