"""dist-alexnet: AlexNet on Fashion-MNIST, trained with Accelerate on one process up to many nodes."""

__version__ = "0.1.0"

from dist_alexnet.config import ConfigError, TrainConfig
from dist_alexnet.model import AlexNet

__all__ = ["AlexNet", "ConfigError", "TrainConfig", "__version__"]
