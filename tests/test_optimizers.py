"""The optimizer's implementation: fused where torch has a kernel for the device, the same updates as foreach."""

import copy

import pytest
import torch

from dist_alexnet.inputs import to_model_input
from dist_alexnet.model import AlexNet
from dist_alexnet.optimization import make_optimizer
from tests.helpers import ADAM_STEP_OPERATIONS, BATCH, EPS32, IMAGE_SIZE, WIDTH, tiny_config, tiny_split, train_tiny


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_is_chosen_on_the_cpu_and_foreach_can_be_forced(name):
    model = AlexNet(width=0.05)
    fused = make_optimizer(tiny_config(optimizer=name), model, 1e-3)
    forced = make_optimizer(tiny_config(optimizer=name, optimizer_implementation="foreach"), model, 1e-3)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    assert forced.defaults["foreach"] and not forced.defaults["fused"]


def test_the_trainer_uses_the_implementation_asked_for(tmp_path, data_dir):
    out = train_tiny(tmp_path / "run", data_dir, "--max-steps", "1", "--optimizer-implementation", "foreach")
    assert "optimizer adam (foreach)" in out.stdout + out.stderr


def assert_within_rounding(fused: torch.Tensor, foreach: torch.Tensor, before: torch.Tensor, what) -> None:
    """The fused kernel evaluates the same update formula as foreach in another order of float32 operations: each
    result within the rounding of those few operations of the other, EPS32 x (|new value| + 4 x |its change|)
    for either, so their sum between the two."""
    rounding = EPS32 * (foreach.abs() + ADAM_STEP_OPERATIONS * (foreach - before).abs())
    difference = (fused - foreach).abs()
    assert (difference <= 2 * rounding).all(), (what, difference.max(), (difference / rounding).max())


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_and_foreach_take_the_same_step_from_the_same_state(data_dir, name):
    """Five steps of the tiny model on real batches, each taken from the same state (weights, gradients and
    optimizer state: those of the foreach run so far) by both implementations: the same new weights and
    optimizer state, to float32 rounding. The runs continue from foreach's result, so no difference carries over
    from one step to the next."""
    torch.manual_seed(0)
    model = AlexNet(width=WIDTH)
    twin = copy.deepcopy(model)
    lr = 0.01 if name == "sgd" else 0.001
    foreach, fused = (make_optimizer(tiny_config(optimizer=name, weight_decay=0.05, optimizer_implementation=kind),
                                     weights, lr) for kind, weights in (("foreach", model), ("fused", twin)))
    assert fused.defaults["fused"] and foreach.defaults["foreach"]
    train = tiny_split(data_dir, train=True)
    for step in range(5):
        images = to_model_input(train.images[step * BATCH:(step + 1) * BATCH], IMAGE_SIZE)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images), train.labels[step * BATCH:(step + 1) * BATCH]).backward()
        with torch.no_grad():  # the same state in: weights, gradients, optimizer state
            for theirs, ours in zip(twin.parameters(), model.parameters()):
                theirs.copy_(ours)
                theirs.grad = ours.grad.clone()
        fused.load_state_dict(copy.deepcopy(foreach.state_dict()))  # (loading would share the tensors)
        before = [p.detach().clone() for p in model.parameters()]
        state_before = copy.deepcopy(foreach.state_dict()["state"])
        foreach.step()
        fused.step()
        for i, (a, b, old) in enumerate(zip(twin.parameters(), model.parameters(), before)):
            assert_within_rounding(a.detach(), b.detach(), old, (name, step, i, "weight"))
            for key, value in foreach.state[b].items():
                if key != "step":
                    old_value = state_before[i][key] if i in state_before else torch.zeros_like(value)
                    assert_within_rounding(fused.state[a][key], value, old_value, (name, step, i, key))
