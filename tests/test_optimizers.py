"""The optimizer's implementation: fused where torch has a kernel for the device, the same updates as foreach."""

import pytest
import torch
from safetensors.torch import load_file

from dist_alexnet.model import AlexNet
from dist_alexnet.optimization import make_optimizer
from tests.helpers import tiny_config, train_tiny


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_is_chosen_on_the_cpu_and_foreach_can_be_forced(name):
    model = AlexNet(width=0.05)
    fused = make_optimizer(tiny_config(optimizer=name), model, 1e-3)
    forced = make_optimizer(tiny_config(optimizer=name, optimizer_implementation="foreach"), model, 1e-3)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    assert forced.defaults["foreach"] and not forced.defaults["fused"]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_and_foreach_train_the_same_weights(tmp_path, data_dir, name):
    """8 optimizer steps of the tiny run with each. The fused kernel evaluates the same update formula in another
    order of float32 operations (one pass, its own sqrt/division order), so the weights agree to float32
    rounding, not bit for bit. Adam divides by the root of the squared gradients, which lifts a rounding difference in a
    tiny gradient to a visible one; after 8 steps the largest difference measured is 3e-5 of a tensor's largest
    weight (classifier.1), so the bound is 1e-4 of it."""
    weights = {}
    for implementation in ("fused", "foreach"):
        run_dir = tmp_path / implementation
        out = train_tiny(run_dir, data_dir, "--max-steps", "8", "--optimizer", name, "--weight-decay", "0.05",
                         "--optimizer-implementation", implementation, "--lr", "0.01" if name == "sgd" else "0.001")
        assert f"optimizer {name} ({implementation})" in out.stdout + out.stderr
        weights[implementation] = load_file(run_dir / "checkpoints" / "step_000008" / "model.safetensors")
    for key, fused in weights["fused"].items():
        foreach = weights["foreach"][key]
        scale = foreach.abs().max().clamp(min=1e-3)
        assert torch.allclose(fused, foreach, rtol=0, atol=1e-4 * float(scale)), (key, (fused - foreach).abs().max())
