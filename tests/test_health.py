"""What the ranks check about each other: identical replicated weights, and stragglers (real processes, gloo)."""

import re

import pytest

from dist_alexnet.health import StragglerWatch
from tests.helpers import assert_clean_failure, cpu_env, metrics, run, scalars, tiny_args, train_tiny


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "hybrid"])
def test_a_rank_whose_weights_drift_stops_the_job_at_the_next_check(tmp_path, data_dir, parallelism):
    args = tiny_args(data_dir, tmp_path / "run", "--max-steps", "12", "--consistency-every", "4", "--parallelism",
                     parallelism)
    result = run(args, processes=2, check=False, env=cpu_env(DIST_ALEXNET_PERTURB="1:5"))
    message = assert_clean_failure(result, processes=2, code=6)
    assert "after step 8, rank 1's copy of features.0.weight differs from rank 0's" in message, message
    assert "step 4" not in message  # the check at step 4 passed: every rank had the same weights then


@pytest.mark.slow
def test_identical_replicas_pass_every_check_and_a_slow_rank_is_named(tmp_path, data_dir):
    result = train_tiny(tmp_path / "run", data_dir, "--max-steps", "16", "--consistency-every", "1",
                        "--log-every", "2", processes=2, env=cpu_env(DIST_ALEXNET_SLOW_RANK="1:0.05"))
    assert metrics(tmp_path / "run")["steps"] == 16  # 16 checks passed
    output = result.stdout + result.stderr
    # (the first log point may count the start-up's slow steps: a warning at step 6 or 8)
    assert re.search(r"warning: straggler at step [68]: rank 1 \(\d+ ms\) slower than the fastest rank", output), output
    assert output.count("warning: straggler") == 1  # said once while it lasts
    lows, highs = scalars(tmp_path / "run", "perf/rank_local_ms_min"), scalars(tmp_path / "run",
                                                                              "perf/rank_local_ms_max")
    assert all(high[1] > 50 for high in highs)  # rank 1's 50 ms sleep
    assert all(high[1] > 2 * low[1] for low, high in list(zip(lows, highs))[1:])  # after the start-up


def test_the_straggler_rule_needs_a_persistent_gap():
    watch = StragglerWatch(factor=1.5, patience=3)
    assert [watch.observe(s, [0.1, 0.2]) for s in (1, 2)] == [None, None]
    assert "rank 1 (200 ms)" in watch.observe(3, [0.1, 0.2])
    assert watch.observe(4, [0.1, 0.2]) is None  # said once
    assert watch.observe(5, [0.1, 0.12]) is None and watch.observe(6, [0.1, 0.2]) is None  # recovered: count anew
    assert StragglerWatch(factor=0).observe(1, [0.1, 9.0]) is None
