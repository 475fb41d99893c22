"""Real multi-process training: `accelerate launch` with 2 CPU processes (DDP over gloo)."""

import pytest

from tests.helpers import (TEST_SAMPLES, accelerate_with, cpu_env, free_port, metrics, run, scalars,
                           single_process_correct, steps_per_epoch, tiny_args, train_tiny)


@pytest.mark.floor
def test_two_process_run_is_one_ddp_job_with_exact_evaluation(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # 101 test samples divide by neither 2 processes nor the batch of 32.
    result = train_tiny(run_dir, data_dir, "--epochs", "2", processes=2)
    m = metrics(run_dir)
    assert m["world_size"] == 2 and m["distributed_type"] == "MULTI_CPU"
    assert m["steps"] == 2 * steps_per_epoch(2)
    assert m["test_samples"] == TEST_SAMPLES
    final = run_dir / "checkpoints" / f"step_{m['steps']:06d}"
    assert m["test_correct"] in single_process_correct(final, data_dir)

    # one writer of each output
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("saved checkpoint") == 2 and result.stdout.count("run directory") == 1
    assert len(scalars(run_dir, "test/acc")) == 2
    # both ranks end with the same weights
    assert len(m["param_checksums"]) == 2 and m["param_checksums"][0] == m["param_checksums"][1]


@pytest.mark.slow
def test_launch_config_file_for_two_cpu_processes(tmp_path, data_dir):
    """launch/accelerate/cpu_2proc.yaml starts two processes that join one job."""
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # the trainer itself falls back to the CPU when CUDA is absent
    run(tiny_args(data_dir, tmp_path / "run", "--max-steps", "3"), env=env,
        launcher=accelerate_with("launch/accelerate/cpu_2proc.yaml", "--main_process_port", str(free_port())))
    m = metrics(tmp_path / "run")
    assert m["world_size"] == 2 and m["steps"] == 3 and m["test_samples"] == TEST_SAMPLES


def test_a_failed_collective_is_named_by_the_phase_the_trainer_was_in():
    """The one line names what the rank was doing as the trainer declared it (the innermost phase), whatever the
    functions on the stack are called; the cause follows from the error's kind (a timeout or a lost peer)."""
    from types import SimpleNamespace

    from dist_alexnet.distributed import collective_failed, phase

    @phase("saving a checkpoint")
    def save():
        with phase("waiting for rank 0 (writing a checkpoint)"):
            raise RuntimeError("[gloo] Timed out waiting 10000ms for recv operation to complete")

    with pytest.raises(RuntimeError) as caught:
        with phase("the end of the run"):
            save()
    line = str(collective_failed(caught.value, SimpleNamespace(process_index=1), step=7, timeout=10))
    assert line.startswith("rank 1: waiting for rank 0 (writing a checkpoint) failed after step 7")
    assert "no answer from another rank within --collective-timeout 10 s" in line
    lost = RuntimeError("Connection closed by peer")
    assert "another rank's process died" in str(collective_failed(lost, SimpleNamespace(process_index=0), 3, 10))
    assert "rank 0: a collective failed after step 3" in str(collective_failed(lost, SimpleNamespace(process_index=0),
                                                                                 3, 10))
