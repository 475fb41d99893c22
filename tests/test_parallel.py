"""--parallelism hybrid: data-parallel convolutions, a tensor-parallel classifier (real processes, gloo).

With dropout 0 and one --global-batch-size, a hybrid step and a one-process ddp step from the same state see the
same examples and compute the same sums in another order: the same step to float32 rounding (assert_same_step).
Over many steps that rounding grows into different trajectories, so the runs are compared one step at a time."""

import shutil

import pytest
from safetensors.torch import load_file

from dist_alexnet.checkpoint import list_checkpoints
from dist_alexnet.model import AlexNet
from tests.helpers import (RECIPE, SUM_ORDER_RTOL, TEST_SAMPLES, WIDTH, assert_clean_failure, assert_same_step,
                           checkpoint_at, final_weights, max_difference, metrics, one_step_from, run, scalars,
                           single_process_correct, tiny_args, train_tiny)

SAME_STEPS = ["--global-batch-size", "32", "--dropout", "0", "--log-every", "1"]


@pytest.mark.floor
def test_hybrid_on_two_processes_takes_one_process_ddps_first_step(tmp_path, data_dir):
    ddp, hybrid = tmp_path / "ddp", tmp_path / "hybrid"
    train_tiny(ddp, data_dir, *SAME_STEPS, "--max-steps", "1")
    out = train_tiny(hybrid, data_dir, *SAME_STEPS, "--max-steps", "1", "--parallelism", "hybrid", processes=2)
    assert "the classifier split over 2 ranks, data-parallel over 1 group(s)" in out.stdout
    assert_same_step(checkpoint_at(ddp, 1), checkpoint_at(hybrid, 1))

    m = metrics(hybrid)
    checkpoint = list_checkpoints(hybrid)[-1]
    AlexNet(width=WIDTH).load_state_dict(load_file(checkpoint / "model.safetensors"))  # the full model, every key
    # exact evaluation through the split classifier (101 samples: the ranks' last batches differ in size)
    assert m["test_samples"] == TEST_SAMPLES and m["test_correct"] in single_process_correct(checkpoint, data_dir)
    assert len(m["param_checksums"]) == 2 and m["param_checksums"][0] == m["param_checksums"][1]  # replicated part


@pytest.mark.slow
def test_a_2x2_mesh_with_accumulation_and_clipping_takes_one_process_ddps_step(tmp_path, data_dir):
    """4 processes: the classifier split over 2 ranks and data-parallel over 2 groups (its shards' gradients
    all-reduced across them); 2 micro-batches per step; the gradient's norm clipped, which needs the norm of the
    whole gradient on every rank."""
    args = [*SAME_STEPS, "--max-steps", "1", "--grad-accum", "2", "--grad-clip", "0.1"]
    ddp, hybrid = tmp_path / "ddp", tmp_path / "hybrid"
    train_tiny(ddp, data_dir, *args)
    out = train_tiny(hybrid, data_dir, *args, "--parallelism", "hybrid", "--tensor-parallel-size", "2", processes=4,
                     timeout=600)
    assert "the classifier split over 2 ranks, data-parallel over 2 group(s)" in out.stdout
    assert_same_step(checkpoint_at(ddp, 1), checkpoint_at(hybrid, 1))
    (_, norm), = scalars(ddp, "train/grad_norm")
    assert norm > 0.1  # (clipping was active)
    (_, hybrid_norm), = scalars(hybrid, "train/grad_norm")
    assert hybrid_norm == pytest.approx(norm, rel=SUM_ORDER_RTOL)


@pytest.mark.slow
@pytest.mark.floor
def test_hybrid_resumes_exactly_and_checkpoints_move_between_ddp_and_hybrid(tmp_path, data_dir):
    """A hybrid run cut mid-epoch and resumed equals the uninterrupted hybrid run bit for bit (weights, Adam state,
    the weight average and each rank's dropout stream are gathered into one checkpoint and split again). A hybrid
    checkpoint resumed by one ddp process, and a one-process ddp checkpoint resumed by two hybrid processes, take
    the step the checkpoint's own layout takes from it (to float32 rounding: the sums are taken in another order),
    with the schedule's learning rate and Adam's moments and step count carried over."""
    recipe = [*RECIPE, "--global-batch-size", "32", "--dropout", "0"]
    stop, end = 39, ["--max-steps", "42"]  # in the second epoch (32 steps each)
    hybrid, hybrid_whole = ["--parallelism", "hybrid"], tmp_path / "hybrid_whole"
    train_tiny(hybrid_whole, data_dir, *recipe, *hybrid, *end, processes=2)
    cut = tmp_path / "hybrid_cut"
    train_tiny(cut, data_dir, *recipe, *hybrid, "--max-steps", str(stop), processes=2)
    hybrid_checkpoint = shutil.copytree(checkpoint_at(cut, stop), checkpoint_at(tmp_path / "hybrid_at_stop", stop))
    train_tiny(cut, data_dir, *recipe, *hybrid, "--max-steps", str(stop + 1), processes=2)  # cut twice
    hybrid_step = checkpoint_at(shutil.copytree(cut, tmp_path / "hybrid_step"), stop + 1)
    train_tiny(cut, data_dir, *recipe, *hybrid, *end, processes=2)
    assert scalars(cut, "train/loss") == scalars(hybrid_whole, "train/loss")
    assert max_difference(final_weights(cut), final_weights(hybrid_whole)) == 0.0
    assert max_difference(final_weights(cut, "ema"), final_weights(hybrid_whole, "ema")) == 0.0

    ddp_step, out = one_step_from(hybrid_checkpoint, tmp_path / "hybrid_to_ddp", data_dir, *recipe)
    assert "the checkpoint was made by 2 process(es), this run has 1" in out
    assert_same_step(ddp_step, hybrid_step, before=hybrid_checkpoint)

    ddp = tmp_path / "ddp"
    train_tiny(ddp, data_dir, *recipe, "--max-steps", str(stop))
    ddp_step, _ = one_step_from(checkpoint_at(ddp, stop), tmp_path / "ddp_step", data_dir, *recipe)
    hybrid_step, out = one_step_from(checkpoint_at(ddp, stop), tmp_path / "ddp_to_hybrid", data_dir, *recipe, *hybrid,
                                     processes=2)
    assert f"resumed from {checkpoint_at(ddp, stop)}" in out
    assert_same_step(ddp_step, hybrid_step, before=checkpoint_at(ddp, stop))


@pytest.mark.floor
def test_combinations_hybrid_cannot_do_are_refused_with_the_reason(tmp_path, data_dir):
    one = run(tiny_args(data_dir, tmp_path / "one", "--parallelism", "hybrid"), check=False)
    assert one.returncode == 2 and "this run has one" in one.stderr and "Traceback" not in one.stderr
    ddp = run(tiny_args(data_dir, tmp_path / "ddp", "--tensor-parallel-size", "2"), check=False)
    assert ddp.returncode == 2 and "--tensor-parallel-size is for --parallelism hybrid" in ddp.stderr


@pytest.mark.slow
def test_a_classifier_that_does_not_split_evenly_is_refused_on_every_rank(tmp_path, data_dir):
    uneven = run(tiny_args(data_dir, tmp_path / "uneven", "--parallelism", "hybrid", "--model-width", "0.05"),
                 processes=2, check=False)
    assert "hidden width of 205" in assert_clean_failure(uneven, processes=2)
