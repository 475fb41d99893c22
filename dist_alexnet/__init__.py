"""dist-alexnet: AlexNet on Fashion-MNIST, trained with Accelerate on one process up to many nodes."""

__version__ = "0.2.0"

from dist_alexnet.config import TrainConfig
from dist_alexnet.errors import ConfigError

__all__ = ["AlexNet", "ConfigError", "TrainConfig", "__version__"]


def __getattr__(name: str):
    # AlexNet imports torch: only when asked for, so that the command line starts (and catches signals) at once
    if name == "AlexNet":
        from dist_alexnet.model import AlexNet

        return AlexNet
    raise AttributeError(f"module 'dist_alexnet' has no attribute {name!r}")
