"""Config: defaults are the reference run, precedence CLI > YAML > defaults, every bad value explained."""

import pytest

from dist_alexnet.cli import build_parser
from dist_alexnet.config import ConfigError, TrainConfig, config_from_args

from tests.helpers import run


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_defaults_are_the_reference_run():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.image_size) == (1e-3, 128, 3, 224)
    assert (cfg.dataset, cfg.pipeline, cfg.resume, cfg.keep_checkpoints) == ("fashion-mnist", "device", "auto", 3)


def test_cli_overrides_yaml_overrides_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 1e-4\nbatch-size: 64\nepochs: 5\n")
    cfg = parse("--config", str(yaml_file), "--epochs", "7", "--no-download")
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.download) == (1e-4, 64, 7, False)
    assert cfg.image_size == 224


@pytest.mark.parametrize("values, words", [
    ({"lr": 0.0}, "--lr must be a positive"),
    ({"lr": -1.0}, "--lr must be a positive"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"image_size": 63}, "--image-size must be >= 64"),
    ({"keep_checkpoints": 1}, "--keep-checkpoints must be >= 2"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"max_steps": 0}, "--max-steps must be >= 1"),
    ({"mixed_precision": "fp16"}, "fp16 needs a CUDA GPU"),
    ({"dataset": "mnist"}, "--dataset 'mnist' is not one of"),
])
def test_bad_values_are_refused_with_the_fix(values, words, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**values).validate()


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        TrainConfig(lr=0, batch_size=0, keep_checkpoints=1).validate()
    assert len(str(err.value).splitlines()) == 3


@pytest.mark.parametrize("text, words", [
    ("- 1\n- 2\n", "must hold a mapping"),
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("epochs: three\n", "epochs must be int"),
    ("lr: [1]\n", "lr must be float"),
])
def test_bad_yaml_files(tmp_path, text, words):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(text)
    with pytest.raises(ConfigError, match=words):
        parse("--config", str(yaml_file))


def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    result = run(["--lr", "-1", "--output-dir", str(tmp_path / "run")], check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dist-alexnet: error: --lr must be a positive finite number (got -1.0); the reference run uses 1e-3"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_booleans_paths_and_an_empty_config_are_read_as_a_user_means_them(tmp_path, monkeypatch):
    """YAML 1.1 reads `mixed_precision: no` as False: the error says to quote it. `~` and $VARIABLES in path options
    are expanded (from YAML too); an unset variable is an error, not a folder named `$NAME`. `--config ''` (an
    unset variable in a job script) is refused, not ignored."""
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("mixed_precision: no\n")
    with pytest.raises(ConfigError, match=r"mixed_precision must be text.*put the value in quotes"):
        parse("--config", str(yaml_file))
    yaml_file.write_text("mixed_precision: 'no'\noutput_dir: ~/runs/a\ndata_dir: $DATA_ROOT/fmnist\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    cfg = parse("--config", str(yaml_file), "--resume", "${DATA_ROOT}/ckpt")
    assert cfg.mixed_precision == "no" and cfg.output_dir == str(tmp_path / "home" / "runs" / "a")
    assert cfg.data_dir == str(tmp_path / "data" / "fmnist") and cfg.resume == str(tmp_path / "data" / "ckpt")
    assert parse("--resume", "none").resume == "none"
    monkeypatch.delenv("DATA_ROOT")
    with pytest.raises(ConfigError, match=r"environment variable that is not set"):
        parse("--data-dir", "$DATA_ROOT/fmnist")
    with pytest.raises(ConfigError, match=r"--config is empty"):
        parse("--config", "")
