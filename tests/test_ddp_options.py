"""DDP options reach PyTorch's DDP wrapper in a real 2-process run: bucket size, gradient_as_bucket_view,
and the bf16 gradient-compression hook (which changes the weights, and keeps the ranks in step)."""

import pytest

from tests.helpers import metrics, train_tiny

pytestmark = pytest.mark.slow  # two 2-process runs


def test_ddp_options_are_passed_to_ddp(tmp_path, data_dir):
    default = train_tiny(tmp_path / "default", data_dir, "--max-steps", "3", processes=2)
    assert "DDP: gradient buckets of 25 MB, gradient_as_bucket_view True, gradients all-reduced in fp32" \
        in default.stdout

    tuned = train_tiny(tmp_path / "tuned", data_dir, "--max-steps", "3", "--ddp-bucket-mb", "1",
                       "--no-ddp-gradient-as-bucket-view", "--ddp-comm-hook", "bf16", processes=2)
    assert "DDP: gradient buckets of 1 MB, gradient_as_bucket_view False, gradients all-reduced in bf16" \
        in tuned.stdout

    plain, compressed = metrics(tmp_path / "default"), metrics(tmp_path / "tuned")
    for m in (plain, compressed):
        assert m["steps"] == 3 and m["param_checksums"][0] == m["param_checksums"][1]
    # bf16 rounding of the all-reduced gradients shows in the weights
    assert plain["param_checksums"][0] != compressed["param_checksums"][0]
