"""torch.hub entry point of dist-alexnet:

    model = torch.hub.load("path/to/dist-alexnet", "alexnet", source="local", weights="exports/demo")

`weights` is a folder written by `dist-alexnet export` (or a Hugging Face repository id with one); without it,
an untrained AlexNet built from the keyword arguments (num_classes, in_channels, width, dropout).
"""

dependencies = ["torch", "safetensors", "huggingface_hub"]


def alexnet(weights=None, **kwargs):
    """dist-alexnet's AlexNet for 1-channel Fashion-MNIST images, in eval mode when `weights` are given."""
    from dist_alexnet.model import AlexNet

    if weights is not None:
        return AlexNet.from_pretrained(weights).eval()
    return AlexNet(**kwargs)
