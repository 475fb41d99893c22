"""Property-based checks of the input boundary (hypothesis): whatever bytes or options a user hands over, each
reader either accepts them or raises the project's one-line error, never anything else; a fixed number of examples
per property, derandomized, so a run is repeatable and takes seconds.

The readers here are the ones every command goes through: IDX files (the data), YAML config files and option
combinations (train's configuration), image files (predict), trainer_state.json (resume)."""

from __future__ import annotations

import gzip
import io
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dist_alexnet.checkpoint import TRAINER_STATE, load_checkpoint
from dist_alexnet.cli import build_parser
from dist_alexnet.config import TrainConfig, config_from_args, load_yaml
from dist_alexnet.datasets import read_idx
from dist_alexnet.errors import CheckpointError, ConfigError, DataError
from dist_alexnet.serving import ImageError, read_image

EXAMPLES = settings(max_examples=100, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def idx_bytes():
    """IDX-like files: a plausible header (magic, type, dimensions, sizes) over a body of any length, or noise."""
    header = st.tuples(st.sampled_from([0, 1]), st.sampled_from([0, 8, 9]), st.integers(0, 4),
                       st.lists(st.integers(0, 70), min_size=0, max_size=4))
    body = st.binary(max_size=3000)

    def assemble(parts):
        (zero, kind, ndim, sizes), data = parts
        return bytes([0, zero, kind, ndim]) + b"".join(n.to_bytes(4, "big") for n in sizes) + data
    return st.one_of(st.tuples(header, body).map(assemble), st.binary(max_size=200))


@EXAMPLES
@given(data=idx_bytes(), ndim=st.sampled_from([1, 3]), compressed=st.booleans())
def test_any_idx_file_is_read_or_refused_in_one_line(tmp_path, data, ndim, compressed):
    path = tmp_path / ("file.gz" if compressed else "file")
    path.write_bytes(gzip.compress(data) if compressed else data)
    try:
        array = read_idx(path, ndim)
    except DataError as err:
        assert str(path) in str(err) and "\n" not in str(err)
    else:
        assert array.dim() == ndim and len(array) > 0


OPTION_VALUES = {
    "--epochs": st.integers(-2, 5).map(str), "--lr": st.sampled_from(["1e-3", "0", "-1", "nan", "inf", "abc"]),
    "--batch-size": st.integers(-1, 300).map(str), "--global-batch-size": st.integers(-1, 300).map(str),
    "--grad-accum": st.integers(-1, 4).map(str), "--image-size": st.integers(0, 2000).map(str),
    "--model-width": st.sampled_from(["0.125", "0", "-1", "5", "nan"]),
    "--warmup-steps": st.integers(-1, 10).map(str), "--warmup-epochs": st.sampled_from(["0.5", "-1", "100"]),
    "--lr-schedule": st.sampled_from(["constant", "cosine", "onecycle", "linear"]),
    "--optimizer": st.sampled_from(["adam", "adamw", "sgd", "lamb"]),
    "--momentum": st.sampled_from(["0.9", "-0.1", "2"]), "--ema-decay": st.sampled_from(["0.999", "0", "1", "2"]),
    "--mixed-precision": st.sampled_from(["no", "bf16", "fp16", "fp8"]),
    "--parallelism": st.sampled_from(["ddp", "hybrid", "fsdp", "zero"]),
    "--tensor-parallel-size": st.integers(-1, 4).map(str), "--keep-checkpoints": st.integers(-1, 4).map(str),
    "--report-to": st.sampled_from(["tensorboard", "none", "all", "mlflow,wandb", "comet"]),
    "--random-erasing": st.sampled_from(["0.5", "-0.1", "1.5"]), "--seed": st.sampled_from(["0", "-1", "4294967296"]),
    "--profile-steps": st.sampled_from(["2:4", "4:2", "x", "0:1"]),
    "--ddp-comm-hook": st.sampled_from(["none", "bf16"]),
    "--output-dir": st.text(alphabet=string.ascii_letters + "/~$._-", min_size=1, max_size=12),
}


@EXAMPLES
@given(options=st.dictionaries(st.sampled_from(sorted(OPTION_VALUES)), st.just(None), max_size=6).flatmap(
    lambda chosen: st.fixed_dictionaries({flag: OPTION_VALUES[flag] for flag in chosen})))
def test_any_option_combination_is_a_config_or_one_error_listing_the_problems(options):
    argv = ["train", *[part for flag, value in options.items() for part in (flag, value)]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: a value of the wrong type or not among the choices
        assert exit_.code == 2
        return
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        assert str(err).strip(), options
    else:
        assert isinstance(cfg, TrainConfig)


YAML_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                        st.text(max_size=8), st.lists(st.integers(), max_size=2))
YAML_KEYS = st.sampled_from([flag.replace("-", "_")[2:] for flag in OPTION_VALUES]
                            + ["learning_rate", "epochs", "image-size"])


@EXAMPLES
@given(data=st.one_of(st.dictionaries(YAML_KEYS, YAML_VALUES, max_size=5), st.lists(st.integers(), max_size=3),
                      st.text(max_size=20)))
def test_any_yaml_config_is_read_or_refused_in_one_error(tmp_path, data):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    try:
        values = load_yaml(path)
    except ConfigError as err:
        assert str(path) in str(err)
        return
    try:
        TrainConfig(**values).validate()
    except (ConfigError, TypeError) as err:  # TypeError: a type load_yaml lets through would be a bug here
        assert isinstance(err, ConfigError), (values, err)


@EXAMPLES
@given(data=st.one_of(st.binary(max_size=300), st.sampled_from(["png", "jpeg", "gif", "bmp"]).flatmap(
    lambda kind: st.tuples(st.just(kind), st.integers(1, 60), st.integers(1, 60),
                           st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16"])))))
def test_any_file_given_to_predict_is_read_as_28x28_or_skipped_in_one_line(tmp_path, data):
    path = tmp_path / "input"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        kind, width, height, mode = data
        buffer = io.BytesIO()
        try:
            Image.new(mode, (width, height), 7).save(buffer, format=kind)
        except (OSError, ValueError, KeyError):  # a mode the format cannot hold
            return
        path.write_bytes(buffer.getvalue())
    try:
        image = read_image(path)
    except ImageError as err:
        assert str(path) in str(err) and "\n" not in str(err)
    else:
        assert image.shape == (28, 28) and image.dtype.name == "uint8"


@EXAMPLES
@given(state=st.one_of(st.dictionaries(st.sampled_from(["step", "epoch", "position", "applied_steps", "best_test_acc",
                                                         "config", "signature", "world_size"]),
                                       YAML_VALUES, max_size=8),
                       st.lists(st.integers(), max_size=2), st.text(max_size=10)))
def test_any_trainer_state_is_read_or_refused_naming_the_file(tmp_path, state):
    checkpoint = tmp_path / "step_000001"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / TRAINER_STATE).write_text(state if isinstance(state, str) else json.dumps(state))
    with pytest.raises(CheckpointError) as refused:  # (no weights beside it: refused in any case, in one error)
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(refused.value)
