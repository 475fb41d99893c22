"""The `dist-alexnet` command: subcommands mapped onto the library's functions.

Each subcommand imports its work's modules inside its run_* function, when it runs: they import torch,
accelerate and tensorboard (seconds), which --help, --version and a bad option must not wait for, and before which
a preemption signal must already be caught."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import os
import signal
import sys
import threading
from pathlib import Path

from dist_alexnet import __version__
from dist_alexnet.config import ConfigError, add_arguments, config_from_args, options_for
from dist_alexnet.errors import EXIT_CODES, Interrupted, ReportError
from dist_alexnet.lr_sweep import Sweep
from dist_alexnet.preemption import PreemptionFlag

# Errors that end the command with one clear line (and their exit code), no traceback.
ONE_LINE_ERRORS = tuple(EXIT_CODES)
CLOSED_STDOUT = 141  # what a shell reports for a command that SIGPIPE ended (128 + 13)
MODEL_HELP = "a training checkpoint (checkpoints/step_NNNNNN), a run directory (its best checkpoint) or an export"


class Parser(argparse.ArgumentParser):
    """argparse's parser, except that a bad command line is one line like every other error (argparse prints the
    whole usage first: 40 lines for train), with the --help that lists the options. Subcommands inherit it."""

    def error(self, message: str):
        sys.stderr.write(f"dist-alexnet: error: {message}; see `{self.prog} --help`\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dist-alexnet", description="Distributed AlexNet on Fashion-MNIST.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)  # --debug for every subcommand that reports input errors
    debug.add_argument("--debug", action="store_true", help="show full tracebacks for input errors")

    train = commands.add_parser("train", parents=[debug],
                                help="train AlexNet (run under `accelerate launch` for many processes)")
    add_arguments(train)
    train.set_defaults(run=run_train)

    lr_find = commands.add_parser("lr-find", parents=[debug],
                                  help="the learning-rate range test: the loss over an exponentially rising learning "
                                       "rate, a suggested --lr, a plot (run under `accelerate launch` like train)")
    add_lr_find_arguments(lr_find)
    lr_find.set_defaults(run=run_lr_find)

    add_benchmark_command(commands, debug)
    add_scaling_model_command(commands, debug)
    add_model_commands(commands, debug)
    report = commands.add_parser("report", parents=[debug], help="rebuild RUN_DIR/report.md and its figures from the run's event files")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (the trainer's --output-dir)")
    report.set_defaults(run=run_report)
    for subcommand in commands.choices.values():
        subcommand.set_defaults(parser=subcommand)  # for the errors found after parsing: parse()
    return parser


def add_benchmark_command(commands, debug: argparse.ArgumentParser) -> None:
    bench = commands.add_parser("benchmark", parents=[debug],
                                help="measure the model step, the trainer step with each input "
                                "pipeline and the pipelines alone, side by side (images/s, MFU)")
    # what is measured: train's options, at the benchmark's own default batch
    add_arguments(bench, only=options_for("benchmark"), overrides={"batch_size": {"default": 128}})
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: CUDA when available (default: auto)")
    bench.add_argument("--steps", type=int, default=10, help="steps per timed window (default: 10)")
    bench.add_argument("--windows", type=int, default=5, help="timed windows; figures are medians (default: 5)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first, per measurement (default: 3)")
    bench.add_argument("--peak-tflops", type=float, default=None,
                       help="the device's peak TFLOP/s for MFU (default: from a table of known GPUs)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as one JSON object")
    bench.add_argument("--processes", type=int, default=1,
                       help="N > 1: the trainer's step on 1 and on N processes (started with torchrun) side by side, "
                            "with the gradient all-reduce's time, overlap and the scaling model's prediction")
    bench.add_argument("--threads-per-process", type=int, default=None,
                       help="with --processes: torch threads in each process (default: CPU cores / N)")
    bench.add_argument("--ddp-comm-hook", nargs="+", choices=("none", "bf16", "fp16"), default=["none"],
                       help="with --processes: gradient all-reduce in fp32 (none) or compressed; several are "
                            "measured one after the other (default: none)")
    bench.add_argument("--ddp-bucket-mb", nargs="+", type=int, default=[25],
                       help="with --processes: DDP bucket sizes to measure (default: 25)")
    bench.add_argument("--parallelism", nargs="+", choices=("ddp", "hybrid", "fsdp"), default=["ddp"],
                       help="with --processes: the parallelisms to measure, one after the other (default: ddp)")
    bench.add_argument("--tensor-parallel-size", type=int, default=None,
                       help="with --parallelism hybrid: ranks that split the classifier (default: all processes)")
    bench.add_argument("--global-batch-size", type=int, default=None,
                       help="with --processes: strong scaling: this many images per step over all processes (each "
                            "gets global / N), against one process at the whole batch (default: weak scaling, "
                            "--batch-size per process)")
    bench.set_defaults(run=run_benchmark)



def add_scaling_model_command(commands, debug: argparse.ArgumentParser) -> None:
    scaling = commands.add_parser("scaling-model", parents=[debug],
                                  help="predict the step time and weak-scaling efficiency on 1-512 GPUs (nodes of "
                                       "8) from one GPU's step and the links")
    scaling.add_argument("--profile", metavar="JSON",
                         help="one process's step profile: a `benchmark --processes N --json` result or the --json "
                              "of an earlier scaling-model --measure (default: an assumed H200 step)")
    scaling.add_argument("--measure", action="store_true",
                         help="measure the profile here, on this machine's GPU (or CPU), at --batch-size")
    # the step measured with --measure (--image-size also sizes the assumed step): train's options, at a GPU's batch
    add_arguments(scaling, only=options_for("scaling-model"),
                  overrides={"batch_size": {"default": 512}, "mixed_precision": {"default": "bf16",
                                                                                   "choices": ("no", "bf16")}})
    scaling.add_argument("--intra-node-gbs", type=float, default=None,
                         help="all-reduce bus bandwidth per GPU inside a node, GB/s (default: 360, NVLink 4)")
    scaling.add_argument("--inter-node-gbs", type=float, default=None,
                         help="all-reduce bus bandwidth per GPU between nodes, GB/s (default: 45, InfiniBand NDR "
                              "400 Gb/s per GPU)")
    scaling.add_argument("--json", metavar="PATH", help="also write the table (and the profile) as JSON")
    scaling.set_defaults(run=run_scaling_model)



def add_model_commands(commands, debug: argparse.ArgumentParser) -> None:
    """evaluate, predict and export: the subcommands that work on a trained model."""
    evaluate = model_command(commands, debug, "evaluate", run_evaluate,
                             "exact accuracy, loss, per-class accuracy and confusion matrix of a checkpoint (one "
                             "process, or many under `accelerate launch`)")
    evaluate.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_arguments(evaluate, only=options_for("evaluate"))  # default: the values the checkpoint was trained with

    predict = model_command(commands, debug, "predict", run_predict,
                            "the classes of image files (PNG, JPEG, any PIL-readable image)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or directories of them")
    predict.add_argument("--invert", action="store_true",
                         help="Fashion-MNIST items are light objects on a dark background: invert photos of dark "
                              "objects on a light background")
    predict.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: 3)")
    predict.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    predict.add_argument("--json", action="store_true", help="print one JSON object instead of one line per image")
    predict.add_argument("--onnx", action="store_true",
                         help="run the export's model.onnx with ONNX Runtime (no torch): --checkpoint names an export "
                              "made with --format onnx")

    export = model_command(commands, debug, "export", run_export,
                           "a Hugging Face-style folder (config.json, model.safetensors, README.md model card), "
                           "optionally with an ONNX graph checked against PyTorch")
    export.add_argument("--out", required=True, help="the folder to write (new or empty)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out (never anything else: a run directory, a checkpoint "
                             "or other files are refused)")
    export.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                        help="onnx: also model.onnx (uint8 images in, preprocessing in the graph), checked against "
                             "PyTorch on real test images; needs the [onnx] extra (default: safetensors)")
    export.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="then upload the folder to this Hugging Face model repository (needs a network and "
                             "`huggingface-cli login`)")


def model_command(commands, debug: argparse.ArgumentParser, name: str, run, help: str) -> argparse.ArgumentParser:
    """A subcommand that works on a trained model: --checkpoint (and --debug) are its first options."""
    parser = commands.add_parser(name, parents=[debug], help=help)
    parser.add_argument("--checkpoint", required=True, help=MODEL_HELP)
    parser.set_defaults(run=run)
    return parser


def add_lr_find_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of train options (command-line flags override it); those lr-find "
                                         "has no use for (the schedule, the epochs, checkpoints) are ignored")
    add_arguments(parser, only=options_for("lr-find"))
    parser.add_argument("--start-lr", type=float, default=Sweep.start_lr, help="(default: %(default)g)")
    parser.add_argument("--end-lr", type=float, default=Sweep.end_lr, help="(default: %(default)g)")
    parser.add_argument("--num-steps", type=int, default=Sweep.num_steps,
                        help="optimizer steps of the sweep, fewer when the loss diverges first (default: %(default)s)")
    parser.add_argument("--smoothing", type=float, default=Sweep.smoothing,
                        help="beta of the loss's exponential moving average (default: %(default)g)")
    parser.add_argument("--diverge-factor", type=float, default=Sweep.diverge_factor,
                        help="stop once the smoothed loss exceeds this times its best (default: %(default)g)")
    parser.add_argument("--json", metavar="PATH", help="also write the result (suggested_lr, the curve) here")


def run_lr_find(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    sweep = Sweep(args.start_lr, args.end_lr, args.num_steps, args.smoothing, args.diverge_factor).validate()
    from dist_alexnet.lr_find import lr_find  # (here, not at the top: see the module's docstring)

    try:
        lr_find(cfg, sweep, args.json)
    finally:
        gc.collect()  # as after training: free the process group's threads before interpreter shutdown
    return 0


def run_train(args: argparse.Namespace) -> int:
    # The preemption signals are caught from the first moment: one that comes during the slow imports or the
    # set-up is answered at the first training step (a checkpoint, then the requeue), not by dying of it.
    with PreemptionFlag() as preemption:
        cfg = config_from_args(args)  # a bad option is reported before the slow imports
        from dist_alexnet.train import train

        try:
            train(cfg, preemption)
        finally:
            # Free the DDP model while the interpreter is fully alive: it keeps the gloo process group and its
            # worker threads alive past destroy_process_group, and destroying them at interpreter shutdown can
            # abort the process ("terminate called without an active exception"), more often when a rank
            # finishes earlier than the others.
            gc.collect()
    return 0  # also after a preemption: the checkpoint is saved and the job (re)queued


def run_benchmark(args: argparse.Namespace) -> int:
    from dist_alexnet.perf.benchmark import main

    return main(args)


def run_scaling_model(args: argparse.Namespace) -> int:
    from dist_alexnet.perf.scaling_model import main

    return main(args)


def run_evaluate(args: argparse.Namespace) -> int:
    from dist_alexnet import inference

    overrides = {name: getattr(args, name) for name in options_for("evaluate") if hasattr(args, name)}
    try:
        results = inference.evaluate_checkpoint(args.checkpoint, args.split, overrides)
    finally:
        gc.collect()  # as after training: free the process group's threads before interpreter shutdown
    if results is not None:  # rank 0 prints
        print(json.dumps(results) if args.json else inference.format_evaluation(results))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError(f"--top-k and --batch-size must be >= 1 (got {args.top_k}, {args.batch_size})")
    from dist_alexnet import serving  # PIL and numpy: predict --onnx imports neither torch nor accelerate

    files, problems = serving.image_files(args.images)
    if args.onnx:
        classifier = serving.onnx_classifier(Path(args.checkpoint))
    else:
        from dist_alexnet import inference

        trained = inference.load_trained_model(args.checkpoint, log=lambda message: print(message, file=sys.stderr))
        classifier = inference.torch_classifier(trained)
    predictions, unreadable = serving.predict(classifier, files, args.invert, args.batch_size, args.top_k)
    problems += unreadable
    if args.json:
        print(json.dumps({"checkpoint": str(classifier.source), "predictions": predictions,
                          "errors": [{"file": file, "error": reason} for file, reason in problems]}))
    else:
        for prediction in predictions:
            print(serving.format_prediction(prediction))
    for _, reason in problems:
        print(f"dist-alexnet: error: {reason}", file=sys.stderr)
    return 2 if problems else 0  # every readable file still got its prediction


def run_export(args: argparse.Namespace) -> int:
    from dist_alexnet import export

    folder = export.export_model(args.checkpoint, args.out, onnx=args.format == "onnx",
                          log=lambda m: print(m, file=sys.stderr), overwrite=args.overwrite)
    print(f"exported: {folder}")
    if args.push_to_hub:
        print(f"pushed: {export.push_to_hub(folder, args.push_to_hub)}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from dist_alexnet.report import write_report

    try:
        print(write_report(args.run_dir))
    except OSError as err:
        raise ReportError(f"cannot write the report into {args.run_dir}: {err.filename or args.run_dir} "
                          f"({err.strerror or err}); make the run directory writable, or copy it somewhere "
                          f"writable and run `dist-alexnet report` on the copy") from None
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; an option the subcommand does not have is reported by the subcommand's parser, so that
    the error points to its --help (argparse's top-level parser would report it, pointing to its own)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with contextlib.suppress(AttributeError, ValueError):  # (a replaced stdout, as under pytest's capture)
        sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 prints, escaped
    try:
        with stop_on_signals(args.run is not run_train):
            code = args.run(args)
        sys.stdout.flush()  # here, where a full disk or a closed pipe behind stdout is still this boundary's
        return code
    except BrokenPipeError:  # stdout closed early (`predict ... | head`): end quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush must not fail again)
        return CLOSED_STDOUT
    except (OSError, UnicodeError, MemoryError) as err:  # the machine said no, wherever the command was
        if getattr(args, "debug", False):
            raise
        finish_exiting_when_the_launcher_stops_us()
        return report_error(ConfigError(environment_error(err)), EXIT_CODES[ConfigError])
    except ONE_LINE_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        finish_exiting_when_the_launcher_stops_us()
        return report_error(err, next(code for kind, code in EXIT_CODES.items() if isinstance(err, kind)))
    except KeyboardInterrupt:  # Ctrl-C outside training, or the second one during it (the first saves and stops)
        if getattr(args, "debug", False):
            raise
        return report_error(Interrupted("interrupted (Ctrl-C): stopped at once; a training run continues from its "
                                        "newest complete checkpoint with --resume auto"), EXIT_CODES[Interrupted])


@contextlib.contextmanager
def stop_on_signals(active: bool):
    """For the commands other than train (which saves a checkpoint and stops at its next step): SIGTERM and SIGHUP
    end the command as Ctrl-C does, through its cleanup (no temporary file left) and one line, exit 130."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; nothing half-written was left")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def environment_error(err: BaseException) -> str:
    """One line for what the operating system refused: the path, the reason, what to do."""
    if isinstance(err, MemoryError):
        return ("out of memory: the data, the batch or the model does not fit this machine's memory; use a smaller "
                "--batch-size, --image-size or data set size")
    if isinstance(err, UnicodeError):
        return (f"a file name or text that is not valid in this locale's encoding ({err}); rename it, or run with "
                f"a UTF-8 locale (LANG=C.UTF-8)")
    path = err.filename if err.filename is not None else "the output"
    advice = {errno.ENOSPC: "free some space or write elsewhere", errno.EFBIG: "the file size limit (ulimit -f) "
              "is reached; raise it or write elsewhere", errno.EISDIR: "a directory is in the way: give a file path",
              errno.EACCES: "check its permissions or write elsewhere", errno.EPERM: "check its permissions or write "
              "elsewhere", errno.EROFS: "the file system is read-only: write elsewhere", errno.ENOENT: "check the "
              "path"}.get(err.errno, "check the path and the disk")
    return f"{path}: {err.strerror or err}; {advice}"


def finish_exiting_when_the_launcher_stops_us() -> None:
    """In a job of several processes every rank stops with the same one-line error, and the launcher sends SIGTERM
    to the ranks still running as soon as the first has exited: a rank caught in its own (slow) interpreter
    shutdown would die of that signal instead of exiting with the error's code. It finishes exiting instead."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def report_error(err: Exception, code: int) -> int:
    """One `dist-alexnet: error:` line per line of the message; returns the exit code."""
    lines = str(err).splitlines() or [type(err).__name__]
    # one write: the lines of several ranks sharing a pipe do not interleave (print writes the newline apart)
    sys.stderr.write("".join(f"dist-alexnet: error: {line}\n" for line in lines))
    sys.stderr.flush()
    return code


def run_command() -> None:
    """The process's entry point (`dist-alexnet`, `python -m dist_alexnet.cli`): main(), then the exit."""
    code = main()
    if code == 0:
        # A finished command has released what it had to (the runs free their models with gc.collect and close
        # their files and trackers); the interpreter's last garbage collection would walk torch's whole object
        # graph once more, about 1 s per process here, which every launch, restart and requeue waits for.
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run_command()
