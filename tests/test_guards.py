"""Failures that must end a run cleanly on every rank: missing data (found by the first rank to load it), an
output directory that cannot be written, a disk that fills up (a real, small tmpfs) while a checkpoint, the
TensorBoard events or the results are written, a NaN loss on rank 1 only; and fp16 loss-scale drops, a note
rather than an error. Each failure: one line per rank, no traceback, a non-zero exit, and never a hang."""

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dist_alexnet.checkpoint import half_written, list_checkpoints, load_checkpoint
from dist_alexnet.monitor import loss_scale_note
from tests.helpers import TINY, assert_clean_failure, cpu_env, run, tiny_args, tiny_config, train_tiny


def launch(args: list[str], processes: int, timeout: float = 180, env: dict | None = None):
    """The command line, under `accelerate launch` when processes > 1; a hang fails the test."""
    return run(args, processes=processes, timeout=timeout, check=False, env=env)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_missing_data_without_download_stops_every_rank_with_one_line(tmp_path, processes):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [*TINY, "--dataset", "fashion-mnist", "--no-download", "--data-dir", str(empty),
            "--output-dir", str(tmp_path / "run")]
    message = assert_clean_failure(launch(args, processes, timeout=120), processes)
    assert message.startswith(f"Fashion-MNIST not found: {empty / 'FashionMNIST' / 'raw'} lacks ")
    assert "drop --no-download" in message and "--dataset synthetic" in message


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_output_dir_below_a_file_is_refused_before_any_work(tmp_path, processes):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run_dir, data_dir = blocker / "run", tmp_path / "data"
    result = launch(tiny_args(data_dir, run_dir), processes, timeout=120)
    message = assert_clean_failure(result, processes)
    assert message == (f"output directory {run_dir} is not writable ({blocker} is a file, not a directory); "
                       f"choose another --output-dir")
    assert not data_dir.exists()  # refused before the synthetic data set was generated


def test_read_only_output_dir_is_refused(tmp_path, data_dir):
    prefix = []
    if os.geteuid() == 0:  # root ignores permission bits: run as root without that privilege
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode:
            pytest.skip("running as root, which may write into a read-only directory, and setpriv (util-linux) "
                        "cannot drop that privilege here")
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        result = run(tiny_args(data_dir, parent / "run"), timeout=120, check=False, prefix=prefix)
    finally:
        parent.chmod(0o700)
    message = assert_clean_failure(result, 1)
    assert message == (f"output directory {parent / 'run'} is not writable (Permission denied); "
                       f"choose another --output-dir")


# ----------------------------------------------------------------------------- a full disk

# The TINY model's checkpoint takes 10.8 MB (model 3.7 MB, Adam state 7.4 MB) and the event file stays under
# 0.3 MB in these runs: on 16 MB the first checkpoint fits and the second cannot (retention deletes the older
# one only after the new one is committed).
SMALL_DISK = "16m"


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str):
    """A real file system of `size` bytes (tmpfs) at mount_point, unmounted afterwards."""
    mount_point.mkdir()
    if not shutil.which("mount"):
        pytest.skip("cannot mount a tmpfs here: no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", SMALL_DISK) as mount_point:
        yield mount_point


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_disk_full_while_checkpointing_names_the_checkpoint_and_keeps_the_previous(small_disk, data_dir,
                                                                                  processes):
    run_dir = small_disk / "run"
    args = tiny_args(data_dir, run_dir, "--checkpoint-every", "5", "--max-steps", "15")
    message = assert_clean_failure(launch(args, processes), processes)
    previous = run_dir / "checkpoints" / "step_000005"
    assert message == (f"could not write checkpoint {run_dir / 'checkpoints' / 'step_000010'} (No space left on "
                       f"device); the previous one, {previous}, is intact; free space or choose another --output-dir")
    assert list_checkpoints(run_dir) == [previous]
    assert half_written(run_dir) == []  # the partial checkpoint was removed
    loaded = load_checkpoint(previous)
    assert loaded["trainer_state"]["step"] == 5 and len(loaded["rng_states"]) == processes
    assert all(torch.isfinite(tensor).all() for tensor in loaded["model"].values())


def test_full_disk_is_refused_at_start(small_disk, data_dir):
    with open(small_disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass
    run_dir = small_disk / "run"
    result = train_tiny(run_dir, data_dir, check=False, timeout=120)
    message = assert_clean_failure(result, 1)
    assert message == (f"output directory {run_dir} is not writable (No space left on device); "
                       f"choose another --output-dir")
    assert list(run_dir.iterdir()) == []  # the probe file is gone


@pytest.mark.slow
def test_tensorboard_on_a_full_disk_is_a_warning_then_the_checkpoint_stops_every_rank(tmp_path, data_dir):
    """Only rank 0 writes events: a failed write turns TensorBoard off (one warning) rather than stopping rank 0
    alone; training goes on, and the first checkpoint that cannot be written stops both ranks."""
    mount_point = tmp_path / "disk"
    with mounted_tmpfs(mount_point, "64k"):  # room for config.yaml and the first events, not for the input grid
        run_dir = mount_point / "run"
        result = launch(tiny_args(data_dir, run_dir, "--checkpoint-every", "5", "--log-every", "1"), 2)
        message = assert_clean_failure(result, 2)
        assert message == (f"could not write checkpoint {run_dir / 'checkpoints' / 'step_000005'} (No space left on "
                           f"device); no earlier checkpoint exists; free space or choose another --output-dir")
        warning = (f"warning: cannot write TensorBoard events to {run_dir / 'tensorboard'} (No space left on "
                   f"device); training goes on without them")
        assert result.stdout.count(warning) == 1, result.stdout
        assert "step 5/" in result.stdout.split(warning)[1]  # it trained on
        assert half_written(run_dir) == []


@pytest.mark.slow
def test_results_that_cannot_be_written_end_every_rank_with_one_line(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    (run_dir / "metrics.json").mkdir(parents=True)  # stands for any write failure at the end (a full disk)
    result = launch(tiny_args(data_dir, run_dir, "--max-steps", "3"), 2)
    message = assert_clean_failure(result, 2)
    assert message == (f"could not write {run_dir / 'metrics.json'} (Is a directory); training finished and its "
                       f"final checkpoint is saved: free space, then rerun with --output-dir {run_dir} --resume auto "
                       f"to write the results (it resumes from that checkpoint and only evaluates)")
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_000003"]


# ----------------------------------------------------------------------------- non-finite values

@pytest.mark.slow
def test_nan_on_rank_1_only_stops_both_ranks_at_that_step(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = tiny_args(data_dir, run_dir, "--checkpoint-every", "5", "--log-every", "1")
    result = launch(args, 2, env=cpu_env(DIST_ALEXNET_INJECT_NAN="1:8"))
    message = assert_clean_failure(result, 2)  # each rank printed it: both stopped at step 8
    good = run_dir / "checkpoints" / "step_000005"
    assert message == (f"the loss became NaN/inf at step 8 on rank(s) 1; the step was not applied. The learning "
                       f"rate (--lr 0.001) is likely too high for Adam. Last good checkpoint: {good}; resume from "
                       f"it with a lower --lr")
    assert "exitcode  : 3" in result.stderr  # the launcher's summary of our exit code for divergence
    assert list_checkpoints(run_dir) == [good]
    weights = load_checkpoint(good)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_loss_scale_drop_is_a_note():
    assert loss_scale_note(None, 65536.0, 1, 4) is None  # no earlier value
    assert loss_scale_note(65536.0, 65536.0, 1, 4) is None
    assert loss_scale_note(32768.0, 65536.0, 1, 4) is None  # grew back: nothing to say
    assert loss_scale_note(65536.0, 16384.0, 5, 8) == (
        "note: fp16 gradient overflow in steps 5-8: GradScaler skipped step(s) and lowered the loss scale from "
        "65536 to 16384 (normal early in fp16 training; not an error)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling (GradScaler) runs only on CUDA and "
                                                          "this machine has no usable GPU")
def test_fp16_gradient_overflow_is_reported_not_fatal(tmp_path, monkeypatch):
    """A real GradScaler on the GPU: an inf gradient makes it skip the step and halve the scale; the monitor
    says so at the next log step, and training goes on."""
    import torch.nn.functional as F
    from accelerate import Accelerator

    from dist_alexnet.model import build_model
    from dist_alexnet.monitor import Monitor
    from dist_alexnet.optimization import make_optimizer

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    cfg = tiny_config(log_every=1, mixed_precision="fp16")
    accelerator = Accelerator(mixed_precision="fp16", log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("tensorboard")
    model = build_model(cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, make_optimizer(cfg, model))
    notes = []
    monitor = Monitor(accelerator, cfg, start_step=0, log=notes.append)
    inputs = torch.randn(8, 1, 64, 64, device=accelerator.device)
    labels = torch.randint(0, 10, (8,), device=accelerator.device)
    values = {"train/loss": 2.3, "train/acc": 0.1}
    for step, overflow in ((1, True), (2, False)):
        with accelerator.autocast():
            loss = F.cross_entropy(model(inputs), labels)
        accelerator.backward(loss)
        if overflow:
            grad = next(model.parameters()).grad
            grad[(0,) * grad.dim()] = float("inf")
        optimizer.step()
        optimizer.zero_grad()
        monitor.log_train(step, 0, values)
    accelerator.end_training()
    assert notes == ["note: fp16 gradient overflow in step 1: GradScaler skipped step(s) and lowered the loss "
                     "scale from 65536 to 32768 (normal early in fp16 training; not an error)"]


def test_results_are_written_whole_or_not_at_all_on_a_full_disk(small_disk):
    """metrics.json goes through a temporary file: a full disk leaves the previous file (or none), never a part."""
    from dist_alexnet.rundir import write_atomically

    target = small_disk / "metrics.json"
    target.write_text('{"old": true}\n')
    with open(small_disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 2**16)
    with pytest.raises(OSError) as err:
        write_atomically(target, "x" * 2**20)
    assert err.value.filename == str(target)
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "metrics.json"]  # no temporary file left
