import pytest

from dist_alexnet.data import SYNTHETIC_SEED, make_synthetic, synthetic_root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder holding the tiny synthetic set used by tests.helpers.TINY, generated once."""
    folder = tmp_path_factory.mktemp("data")
    make_synthetic(synthetic_root(folder, 1024, 101, SYNTHETIC_SEED), 1024, 101, SYNTHETIC_SEED)
    return folder
