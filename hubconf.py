"""torch.hub entry point of dist-alexnet:

    model = torch.hub.load("path/to/dist-alexnet", "alexnet", source="local", weights="exports/demo")

`weights` is a folder written by `dist-alexnet export` (or a Hugging Face repository id with one); without it,
an untrained AlexNet built from the keyword arguments (num_classes, in_channels, width, dropout).
"""

dependencies = ["torch", "safetensors", "huggingface_hub"]


def alexnet(weights=None, **kwargs):
    """dist-alexnet's AlexNet for 1-channel Fashion-MNIST images, in eval mode when `weights` are given."""
    import json
    from pathlib import Path

    from dist_alexnet.inference import check_model_arguments
    from dist_alexnet.model import AlexNet

    if weights is None:
        check_model_arguments(kwargs, "alexnet()")
        return AlexNet(**kwargs)
    config = Path(weights) / "config.json"
    if not Path(weights).is_dir():  # a Hub repository id: the file from_pretrained reads next, fetched first
        from huggingface_hub import hf_hub_download

        config = Path(hf_hub_download(str(weights), "config.json"))
    try:
        arguments = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config} cannot be read as an export's config.json ({err}); give a folder written by "
                         f"`dist-alexnet export`") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{config} is not an export's config.json (not a mapping)")
    check_model_arguments({k: v for k, v in arguments.items() if k in ("num_classes", "in_channels", "width",
                                                                       "dropout")}, str(config))
    return AlexNet.from_pretrained(weights).eval()
