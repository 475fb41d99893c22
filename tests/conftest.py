import pytest
import torch

from tests.helpers import TEST_SAMPLES, TRAIN_SAMPLES, train_tiny

# Runs in this process compute as the child processes do (cpu_env: OMP_NUM_THREADS=1), so their results are
# bit-identical to a real process's.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: not part of `make test-fast` (a real launcher, cluster, server, "
                                       "a full disk or many runs)")
    config.addinivalue_line("markers", "floor: also run on the oldest supported torch (make test-floor)")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder holding the tiny synthetic set of tests.helpers.TINY, generated once."""
    from dist_alexnet.datasets import SYNTHETIC_SEED, make_synthetic, synthetic_root

    folder = tmp_path_factory.mktemp("data")
    make_synthetic(synthetic_root(folder, TRAIN_SAMPLES, TEST_SAMPLES, SYNTHETIC_SEED), TRAIN_SAMPLES, TEST_SAMPLES,
                   SYNTHETIC_SEED)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """A tiny 1-process run of 2 epochs (checkpoints at steps 32 and 64; the last is the one metrics.json
    describes), shared by the tests that only read it. A test that changes anything works on a copy."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_tiny(run_dir, data_dir, "--epochs", "2")
    return run_dir
