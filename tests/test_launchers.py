"""The launchers besides plain `accelerate launch`: torchrun, and the multi-node path (two
`accelerate launch --num_machines 2` invocations, one per "machine", meeting at 127.0.0.1) with the
launch/accelerate/multi_node.yaml template. Each must form one 2-process DDP job whose weights are
bit-identical to the standard one-machine 2-process run of the same configuration."""

import pytest

from tests.helpers import (TEST_SAMPLES, Lines, accelerate_with, assert_clean_failure, cpu_env, free_port, kill_tree,
                           metrics, run, single_process_correct, start, tiny_args, torchrun, train_tiny)

pytestmark = pytest.mark.slow  # torchrun and two-machine launches

STEPS = ["--max-steps", "3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """Metrics of the standard launch: `accelerate launch --multi_gpu --num_processes 2`, one machine."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_tiny(run_dir, data_dir, *STEPS, processes=2)
    return metrics(run_dir)


def check_one_job(run_dir, data_dir, reference):
    m = metrics(run_dir)
    assert m["world_size"] == 2 and m["distributed_type"] == "MULTI_CPU"
    assert m["steps"] == 3 and m["test_samples"] == TEST_SAMPLES
    assert m["test_correct"] in single_process_correct(run_dir / "checkpoints" / "step_000003", data_dir)
    # the same DDP job as the standard launch: same ranks, same data shards, same all-reduced gradients
    assert m["param_checksums"] == reference["param_checksums"]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer


def test_torchrun_two_processes_form_one_job(tmp_path, data_dir, reference):
    run_dir = tmp_path / "run"
    run(tiny_args(data_dir, run_dir, *STEPS),
        launcher=torchrun("--master_addr", "127.0.0.1", "--master_port", str(free_port())))
    check_one_job(run_dir, data_dir, reference)


def test_two_machines_meet_at_the_head_and_form_one_job(tmp_path, data_dir, reference):
    """Machine rank 0 and 1 as two separate launchers, as multinode.sbatch starts them on two nodes."""
    run_dir, port = tmp_path / "run", free_port()
    launchers = []
    try:
        for machine_rank in (0, 1):
            launchers.append(Lines(start(tiny_args(data_dir, run_dir, *STEPS), launcher=accelerate_with(
                "launch/accelerate/multi_node.yaml", "--num_machines", "2", "--machine_rank", str(machine_rank),
                "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "--mixed_precision", "no"))))
        for out in launchers:
            assert out.finish(timeout=300) == 0, out.text()[-4000:]
    finally:
        for out in launchers:
            kill_tree(out.proc.pid)
    outputs = [out.text() for out in launchers]
    # global rank 0 (machine 0) alone prints and writes
    assert "run directory" in outputs[0] and "run directory" not in outputs[1]
    check_one_job(run_dir, data_dir, reference)


def test_an_accelerate_fsdp_config_runs_the_fsdp_mode_and_says_which_option_it_needs(tmp_path, data_dir):
    """launch/accelerate/fsdp.yaml as users write such files (distributed_type FSDP, FSDP2, bf16): with
    --parallelism fsdp the parameters are sharded by the trainer's own FSDP2, in bf16, and every test sample is
    evaluated once; without it, one line says what to pass. DeepSpeed and Megatron-LM configs are refused in one line."""
    fsdp = accelerate_with("launch/accelerate/fsdp.yaml", "--num_processes", "2", "--main_process_port", str(free_port()))
    out = run(tiny_args(data_dir, tmp_path / "run", *STEPS, "--parallelism", "fsdp"), launcher=fsdp).stdout
    assert "split over 2 ranks" in out
    m = metrics(tmp_path / "run")
    assert m["world_size"] == 2 and m["mixed_precision"] == "bf16" and m["test_samples"] == TEST_SAMPLES
    forgot = run(tiny_args(data_dir, tmp_path / "forgot", *STEPS), launcher=fsdp, check=False)
    assert "pass --parallelism fsdp" in assert_clean_failure(forgot, processes=2)
    for variable in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM"):
        refused = run(tiny_args(data_dir, tmp_path / variable, *STEPS), env=cpu_env(**{variable: "true"}), check=False)
        assert "dist-alexnet does not run" in assert_clean_failure(refused, processes=1)
