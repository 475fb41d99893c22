"""The `dist-alexnet` command: subcommands mapped onto the library's functions."""

from __future__ import annotations

import argparse
import sys

from dist_alexnet import __version__
from dist_alexnet.checkpoint import CheckpointError
from dist_alexnet.config import ConfigError, add_arguments, config_from_args
from dist_alexnet.data import DataError

# Errors that come from what the user handed us: one clear line and exit code 2, no traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-alexnet", description="Distributed AlexNet on Fashion-MNIST.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train AlexNet (run under `accelerate launch` for many processes)")
    add_arguments(train)
    train.add_argument("--debug", action="store_true", help="show full tracebacks for input errors")
    train.set_defaults(run=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from dist_alexnet.train import TrainingDiverged, train  # imports torch/accelerate: keep `--help` fast

    try:
        train(config_from_args(args))
    except TrainingDiverged as err:
        print(f"dist-alexnet: error: {err}", file=sys.stderr)
        return 3
    return 0  # also after a preemption: the checkpoint is saved and the job (re)queued


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        lines = str(err).splitlines() or [type(err).__name__]
        for line in lines:
            print(f"dist-alexnet: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
