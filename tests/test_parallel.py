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
                           checkpoint_at, cpu_env, final_weights, max_difference, metrics, one_step_from, run, scalars,
                           single_process_correct, tiny_args, train_tiny)

SAME_STEPS = ["--global-batch-size", "32", "--dropout", "0", "--log-every", "1"]


@pytest.mark.floor
@pytest.mark.parametrize("mode, layout", [
    ("hybrid", "the classifier split over 2 ranks, data-parallel over 1 group(s)"),
    ("fsdp", "fsdp (every parameter, gradient and Adam state split over 2 ranks)")])
def test_a_sharded_mode_on_two_processes_takes_one_process_ddps_first_step(tmp_path, data_dir, mode, layout):
    """The step, the state each rank holds (hybrid: half the classifier; fsdp: half of everything), the full model in
    the checkpoint, and the exact evaluation through the sharded model."""
    ddp, sharded = tmp_path / "ddp", tmp_path / mode
    train_tiny(ddp, data_dir, *SAME_STEPS, "--max-steps", "1")
    out = train_tiny(sharded, data_dir, *SAME_STEPS, "--max-steps", "1", "--parallelism", mode, processes=2)
    assert layout in out.stdout
    assert_same_step(checkpoint_at(ddp, 1), checkpoint_at(sharded, 1))

    m = metrics(sharded)
    assert m["parallelism"] == mode and m["state_bytes_per_rank"] < 0.6 * metrics(ddp)["state_bytes_per_rank"]
    checkpoint = list_checkpoints(sharded)[-1]
    AlexNet(width=WIDTH).load_state_dict(load_file(checkpoint / "model.safetensors"))  # the full model, every key
    # exact evaluation through the sharded model (101 samples: the ranks' last batches differ in size)
    assert m["test_samples"] == TEST_SAMPLES and m["test_correct"] in single_process_correct(checkpoint, data_dir)
    # the replicated part (none under fsdp) is the same on both ranks
    assert len(m["param_checksums"]) == 2 and m["param_checksums"][0] == m["param_checksums"][1]


@pytest.mark.slow
@pytest.mark.parametrize("mode, layout", [
    ("hybrid", "the classifier split over 2 ranks, data-parallel over 2 group(s)"),
    ("fsdp", "split over 2 ranks, replicated across 2 groups (HSDP)")])
def test_a_2x2_mesh_with_accumulation_and_clipping_takes_one_process_ddps_step(tmp_path, data_dir, mode, layout):
    """4 processes on a 2 x 2 mesh, as on two nodes of two: hybrid splits the classifier over 2 ranks and is
    data-parallel over 2 groups (its shards' gradients all-reduced across them); fsdp shards every parameter
    over 2 ranks and replicates across the 2 groups (HSDP). 2 micro-batches per step; the gradient's norm
    clipped, which needs the norm of the whole gradient on every rank."""
    args = [*SAME_STEPS, "--max-steps", "1", "--grad-accum", "2", "--grad-clip", "0.1"]
    ddp, sharded = tmp_path / "ddp", tmp_path / mode
    train_tiny(ddp, data_dir, *args)
    two_nodes = ["--tensor-parallel-size", "2"] if mode == "hybrid" else []
    out = train_tiny(sharded, data_dir, *args, "--parallelism", mode, *two_nodes, processes=4, timeout=600,
                     env=cpu_env(LOCAL_WORLD_SIZE=2))
    assert layout in out.stdout
    assert_same_step(checkpoint_at(ddp, 1), checkpoint_at(sharded, 1))
    (_, norm), = scalars(ddp, "train/grad_norm")
    assert norm > 0.1  # (clipping was active)
    (_, sharded_norm), = scalars(sharded, "train/grad_norm")
    assert sharded_norm == pytest.approx(norm, rel=SUM_ORDER_RTOL)


SHARDED_MODES = [pytest.param("hybrid", marks=pytest.mark.floor), "fsdp"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", SHARDED_MODES)
def test_a_sharded_run_resumes_exactly_and_its_checkpoints_move_to_and_from_ddp(tmp_path, data_dir, mode):
    """A hybrid (fsdp) run cut mid-epoch and resumed equals the uninterrupted run bit for bit (weights, Adam state,
    the weight average and each rank's dropout stream are gathered into one checkpoint and split again). Its
    checkpoint resumed by one ddp process, and a one-process ddp checkpoint resumed by two hybrid (fsdp)
    processes, take the step the checkpoint's own layout takes from it (to float32 rounding: the sums are taken
    in another order), with the schedule's learning rate and Adam's moments and step count carried over."""
    recipe = [*RECIPE, "--global-batch-size", "32", "--dropout", "0", "--limit-train", "512"]
    stop, end = 19, ["--max-steps", "21"]  # in the second epoch (16 steps each)
    sharded, whole = ["--parallelism", mode], tmp_path / "whole"
    train_tiny(whole, data_dir, *recipe, *sharded, *end, processes=2)
    cut = tmp_path / "cut"
    train_tiny(cut, data_dir, *recipe, *sharded, "--max-steps", str(stop), processes=2)
    sharded_checkpoint = shutil.copytree(checkpoint_at(cut, stop), checkpoint_at(tmp_path / "at_stop", stop))
    train_tiny(cut, data_dir, *recipe, *sharded, "--max-steps", str(stop + 1), processes=2)  # cut twice
    sharded_step = checkpoint_at(shutil.copytree(cut, tmp_path / "sharded_step"), stop + 1)
    train_tiny(cut, data_dir, *recipe, *sharded, *end, processes=2)
    assert scalars(cut, "train/loss") == scalars(whole, "train/loss")
    assert max_difference(final_weights(cut), final_weights(whole)) == 0.0
    assert max_difference(final_weights(cut, "ema"), final_weights(whole, "ema")) == 0.0

    ddp_step, out = one_step_from(sharded_checkpoint, tmp_path / "to_ddp", data_dir, *recipe)
    assert "the checkpoint was made by 2 process(es), this run has 1" in out
    assert_same_step(ddp_step, sharded_step, before=sharded_checkpoint)

    ddp = tmp_path / "ddp"
    train_tiny(ddp, data_dir, *recipe, "--max-steps", str(stop))
    ddp_step, _ = one_step_from(checkpoint_at(ddp, stop), tmp_path / "ddp_step", data_dir, *recipe)
    sharded_step, out = one_step_from(checkpoint_at(ddp, stop), tmp_path / "from_ddp", data_dir, *recipe, *sharded,
                                      processes=2)
    assert f"resumed from {checkpoint_at(ddp, stop)}" in out
    assert_same_step(ddp_step, sharded_step, before=checkpoint_at(ddp, stop))


@pytest.mark.floor
@pytest.mark.parametrize("options, reason", [
    (["--parallelism", "hybrid"], "this run has one"),
    (["--parallelism", "fsdp"], "this run has one"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size is for --parallelism hybrid"),
    (["--parallelism", "fsdp", "--ddp-comm-hook", "bf16"], "--parallelism fsdp has none"),
])
def test_combinations_a_parallelism_cannot_do_are_refused_with_the_reason(tmp_path, data_dir, options, reason):
    refused = run(tiny_args(data_dir, tmp_path / "run", *options), check=False)
    assert refused.returncode == 2 and reason in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_a_classifier_that_does_not_split_evenly_is_refused_on_every_rank(tmp_path, data_dir):
    uneven = run(tiny_args(data_dir, tmp_path / "uneven", "--parallelism", "hybrid", "--model-width", "0.05"),
                 processes=2, check=False)
    assert "hidden width of 205" in assert_clean_failure(uneven, processes=2)
