"""TrainConfig: every training option in one place, validated once before any work starts.

Precedence: command line > YAML file (--config) > the defaults below. The defaults are the
reference tutorial's run (Adam lr 1e-3, batch 128, 3 epochs, images resized to 224).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_alexnet.device import use_cuda
from dist_alexnet.errors import ConfigError


# What a resume does with an option whose value differs from the checkpoint's (an option's `resume=`): by default
# the new value applies from the resumed step on, and the log says so; SILENT: not logged (how this launch
# starts, not the run); refused(why) / refused_mid_epoch(why): a ConfigError, for an option that would change what
# the checkpoint's state means (always, or inside an epoch).
APPLIES, SILENT = "applies", "silent"


def refused(why: str) -> tuple[str, str]:
    return ("refused", why)


def refused_mid_epoch(why: str) -> tuple[str, str]:
    return ("refused mid-epoch", why)


def _opt(default, help: str, *, choices: tuple | None = None, takes: tuple[str, ...] = (), resume=APPLIES,
         history: bool = True, node_local: bool = False):
    """A TrainConfig field and its rules: `choices`; `takes`, the subcommands besides train that take the option
    (evaluate: the data and batch over the checkpoint's; lr-find, benchmark, scaling-model: what they measure);
    `resume`, see APPLIES; `history`, whether the figures sent to the trackers depend on it (False: a resume with
    another value recomputes the same figures, so MLflow and W&B keep the steps they already have); `node_local`,
    whether the nodes of one job may give it different values (a path on each node's own disk); every other
    option must be the same on every rank (rank_fingerprint)."""
    return field(default=default, metadata={"help": help, "choices": choices, "takes": takes, "resume": resume,
                                            "history": history, "node_local": node_local})


def rank_fingerprint(cfg) -> dict:
    """The options every rank of a job must share, as --flag -> value."""
    return {f"--{_flag(f.name)}": getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if not f.metadata["node_local"]}


def options_for(subcommand: str) -> tuple[str, ...]:
    """The TrainConfig fields `subcommand` takes, in TrainConfig's order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if subcommand in f.metadata["takes"])


def figures_depend_on() -> tuple[str, ...]:
    """The options the figures sent to the trackers depend on (history=True)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["history"])


@dataclass
class TrainConfig:
    # --- data ---
    dataset: str = _opt("fashion-mnist", "fashion-mnist (the official files, downloaded when missing); "
                        "fashion-mnist-sample: 3,615 real Fashion-MNIST images shipped with dist-alexnet, split "
                        "3,000 train / 615 test (offline); or synthetic: generated shapes of the ten classes, "
                        "written as IDX files under --data-dir (offline, any size)",
                        choices=("fashion-mnist", "fashion-mnist-sample", "synthetic"),
                        takes=("evaluate", "lr-find"),
                        resume=refused("the data position refers to the checkpoint's data set"))
    data_dir: str = _opt("./data", "folder holding FashionMNIST/raw/*-ubyte (torchvision layout)",
                         takes=("evaluate", "lr-find"), history=False, node_local=True)
    download: bool = _opt(True, "download Fashion-MNIST with torchvision when the files are missing",
                          takes=("evaluate", "lr-find"), history=False, node_local=True)
    limit_train: int | None = _opt(None, "use only the first N training samples (smoke runs)",
                                   takes=("evaluate", "lr-find"),
                                   resume=refused("the data position refers to the checkpoint's training samples"))
    limit_test: int | None = _opt(None, "use only the first N test samples (smoke runs)",
                                  takes=("evaluate",), resume=refused("the test set would not be the checkpoint's"))
    synthetic_train_size: int = _opt(6000, "training samples in the synthetic data set",
                                     takes=("evaluate", "lr-find"),
                                     resume=refused("the data position refers to the checkpoint's data set"))
    synthetic_test_size: int = _opt(1000, "test samples in the synthetic data set",
                                    takes=("evaluate", "lr-find"),
                                    resume=refused("the test set would not be the checkpoint's"))
    pipeline: str = _opt("device", "input pipeline: device (uint8 batches, resize/normalize on the accelerator) "
                         "or torchvision (the tutorial's per-image PIL Resize + ToTensor in workers)",
                         choices=("device", "torchvision"), takes=("evaluate", "lr-find"))
    num_workers: int = _opt(2, "DataLoader worker processes for the torchvision pipeline (the device "
                            "pipeline indexes an in-memory tensor and needs none)",
                            takes=("evaluate", "lr-find", "benchmark"), history=False, node_local=True)
    image_size: int = _opt(224, "side in pixels after resizing the 28x28 images (>= 64)",
                           takes=("lr-find", "benchmark", "scaling-model"),
                           resume=refused("the model learned from images of the checkpoint's size"))
    augment: bool = _opt(False, "random crop (2-pixel zero padding) and horizontal flip of the training "
                         "images, as batch ops on the device; each sample's choice is fixed by (seed, epoch, "
                         "sample index); device pipeline only", takes=("lr-find", "benchmark"))
    random_erasing: float = _opt(0.0, "probability per training image of erasing a random rectangle (torchvision's "
                                 "RandomErasing: 2-33%% of the area, aspect ratio 0.3-3.3) to 0 after normalization, "
                                 "the mean pixel; fixed by (seed, epoch, sample index) like --augment",
                                 takes=("lr-find",))
    # --- model ---
    model_width: float = _opt(1.0, "fraction of AlexNet's channel and hidden widths; 1.0 is the real "
                              "58,299,082-parameter model, smaller values make quick test models",
                              takes=("lr-find", "benchmark", "scaling-model"),
                              resume=refused("the weights have the checkpoint's shapes"))
    dropout: float = _opt(0.5, "dropout probability of the two hidden linear layers", takes=("lr-find",))
    # --- batches ---
    batch_size: int | None = _opt(None, "samples per process per micro-batch (128 unless --global-batch-size "
                                  "is given): more processes, a bigger global batch",
                                  takes=("evaluate", "lr-find", "benchmark", "scaling-model"))
    global_batch_size: int | None = _opt(None, "samples per optimizer step over all processes and "
                                         "--grad-accum micro-batches, instead of --batch-size: the same "
                                         "optimization on any number of processes (it must divide by "
                                         "processes x --grad-accum)", takes=("lr-find",))
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", takes=("lr-find",))
    # --- optimization ---
    epochs: int = _opt(3, "passes over the training set; the learning-rate schedule follows this")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps; changes nothing else (the "
                                 "learning-rate schedule still follows --epochs)", history=False)
    optimizer: str = _opt("adam", "adam, adamw (decoupled weight decay) or sgd", choices=("adam", "adamw", "sgd"),
                          takes=("lr-find",),
                          resume=refused("the optimizer's saved state belongs to the checkpoint's optimizer"))
    lr: float = _opt(1e-3, "peak learning rate (after any warmup), before --lr-scaling")
    lr_scaling: str = _opt("none", "scale --lr from --lr-reference-batch to the run's global batch: linear "
                           "(Goyal et al. 2017), sqrt, or none", choices=("none", "linear", "sqrt"), takes=("lr-find",))
    lr_reference_batch: int = _opt(128, "the global batch --lr is meant for (the reference run's 128)",
                                   takes=("lr-find",))
    lr_schedule: str = _opt("constant", "after the warmup: constant, cosine (to --min-lr at the last step of "
                            "--epochs), or onecycle (a cosine rise from lr/25 over the warmup, 30%% of the run "
                            "by default, then a cosine fall to --min-lr)", choices=("constant", "cosine", "onecycle"))
    warmup_steps: int | None = _opt(None, "optimizer steps of linear warmup from 0 to --lr")
    warmup_epochs: float | None = _opt(None, "warmup length in epochs, instead of --warmup-steps")
    min_lr: float = _opt(0.0, "learning rate at the end of a cosine or onecycle schedule")
    momentum: float | None = _opt(None, "SGD momentum (0.9 unless given; sgd only)", takes=("lr-find",))
    nesterov: bool = _opt(False, "Nesterov momentum (sgd only)", takes=("lr-find",))
    optimizer_implementation: str = _opt("auto", "auto (fused wherever torch has a fused kernel for the device: "
                                         "CPU and CUDA; else foreach), fused or foreach",
                                         choices=("auto", "fused", "foreach"), takes=("lr-find",))
    weight_decay: float = _opt(0.0, "weight decay: L2 penalty in the gradient for adam and sgd, decoupled "
                               "for adamw", takes=("lr-find",))
    grad_clip: float | None = _opt(None, "clip the gradient's global L2 norm to this (train/grad_norm is the "
                                   "norm before clipping)", takes=("lr-find",))
    label_smoothing: float = _opt(0.0, "label smoothing of the training loss (the test loss is plain "
                                  "cross-entropy)", takes=("lr-find",))
    ema_decay: float | None = _opt(None, "keep an exponential moving average of the weights with this decay "
                                   "per optimizer step (e.g. 0.999); evaluated, checkpointed and exported "
                                   "instead of the weights")
    mixed_precision: str | None = _opt(None, "no, fp16 (CUDA only) or bf16; unset = the accelerate launch "
                                       "config's choice, else no", choices=("no", "fp16", "bf16"),
                                       takes=("evaluate", "lr-find", "benchmark", "scaling-model"))
    seed: int = _opt(0, "seed for data order, weights and dropout",
                     takes=("lr-find", "benchmark"),
                     resume=refused_mid_epoch("the rest of the epoch would be drawn in another order "
                                              "(samples seen twice or never)"))
    # --- speed (channels_last and cudnn.benchmark are always on with CUDA) ---
    compile: bool = _opt(False, "torch.compile the model; the first steps are slow while it compiles",
                         takes=("lr-find", "benchmark"))
    ddp_bucket_mb: int = _opt(25, "DDP gradient bucket size in MB (PyTorch's default); a layer bigger than a "
                              "bucket gets one of its own, as AlexNet's 151 and 67 MB linear layers do",
                              takes=("lr-find",))
    ddp_gradient_as_bucket_view: bool = _opt(True, "gradients live in DDP's all-reduce buckets: saves one "
                                             "gradient-sized copy per step and its memory (233 MB for AlexNet)",
                                             takes=("lr-find",))
    ddp_comm_hook: str = _opt("none", "compress gradients to bf16 or fp16 for the all-reduce (half the bytes "
                              "sent, then back to fp32); none sends fp32", choices=("none", "bf16", "fp16"),
                              takes=("lr-find",))
    parallelism: str = _opt("ddp", "ddp: every rank holds the whole model and all-reduces all gradients; hybrid: "
                            "the convolutions data-parallel, the classifier split over --tensor-parallel-size ranks "
                            "(Krizhevsky's 'one weird trick'): far fewer bytes per step (README: Scaling); fsdp: "
                            "parameters, gradients and optimizer state split over the ranks of a node, replicated "
                            "across nodes (torch's FSDP2 / HSDP): the least memory per rank",
                            choices=("ddp", "hybrid", "fsdp"))
    tensor_parallel_size: int | None = _opt(None, "with --parallelism hybrid: the ranks that split the classifier "
                                            "(consecutive ranks; unset = the processes of one node, "
                                            "LOCAL_WORLD_SIZE)")
    consistency_every: int = _opt(500, "optimizer steps between checks that every rank's replicated weights are "
                                  "still identical (a checksum per tensor, compared over ranks); 0 turns it off")
    straggler_factor: float = _opt(1.5, "warn, naming the rank, when a rank's local work per step is this many "
                                   "times the fastest rank's at 3 log points in a row; 0 turns it off")
    # --- run directory, checkpoints, logging ---
    output_dir: str | None = _opt(None, "run directory; unset = runs/<timestamp>", takes=("lr-find",), history=False)
    resume: str = _opt("auto", "auto (newest complete checkpoint in the run directory), none, a checkpoint "
                       "directory, or another run's directory (its newest complete checkpoint)", resume=SILENT,
                       history=False)
    checkpoint_every: int | None = _opt(None, "optimizer steps between checkpoints (plus one at every "
                                        "epoch end and at exit)", history=False)
    keep_checkpoints: int = _opt(3, "newest K checkpoints kept (K >= 2), plus the best by test accuracy", history=False)
    checkpoint_minutes: float | None = _opt(None, "also checkpoint whenever this many minutes of training have "
                                            "passed since the last checkpoint (rank 0's clock)", history=False)
    requeue_on_preempt: bool | None = _opt(None, "after a preemption signal (SIGUSR1/SIGTERM) and its checkpoint, "
                                           "requeue the Slurm job with scontrol; unset = on inside a Slurm job",
                                           history=False)
    collective_timeout: float = _opt(600.0, "seconds a rank waits in a collective (gradient all-reduce, stop "
                                     "check, checkpoint) or for the others to join before it stops with one line "
                                     "naming the likely cause; PyTorch's default is 1800",
                                     takes=("lr-find",), history=False)
    move_old_checkpoints: bool = _opt(False, "when --resume none (or an older --resume PATH) meets a run directory "
                                      "holding newer checkpoints, move the old run's checkpoints, events and results "
                                      "to <output-dir>/old-<time>/ instead of refusing", resume=SILENT, history=False)
    log_every: int = _opt(50, "optimizer steps between log lines and TensorBoard points", takes=("lr-find",))
    tracker_timeout: float = _opt(30.0, "seconds MLflow or W&B may take to answer while their run starts; one that "
                                  "does not stops the run with one line naming where it was to write",
                                  resume=SILENT, history=False)
    report_to: str = _opt("tensorboard", "where the training figures go: tensorboard, mlflow, wandb, all or none, "
                          "or a comma list (mlflow and wandb are extras: pip install 'dist-alexnet[mlflow]')",
                          history=False)
    profile_steps: str | None = _opt(None, "A:B: profile optimizer steps A to B with torch.profiler on every rank; "
                                     "a Chrome/Perfetto trace per rank in <output-dir>/profile/", history=False)
    log_figures: bool = _opt(True, "after each evaluation, draw the confusion matrix, per-class accuracy and "
                             "misclassified test images into TensorBoard (and the report); matplotlib takes "
                             "1-2 s of rank 0's CPU per evaluation", history=False)

    def __post_init__(self):
        if self.batch_size is None and self.global_batch_size is None:
            self.batch_size = 128  # the reference run's, per process

    def validate(self) -> TrainConfig:
        """Raise one ConfigError listing every problem, or return self."""
        problems = []

        def need(ok: bool, message: str):
            if not ok:
                problems.append(message)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                problems.append(f"--{_flag(f.name)} {value!r} is not one of {', '.join(choices)}")
        for name in ("epochs", "grad_accum", "log_every", "synthetic_train_size", "synthetic_test_size",
                     "lr_reference_batch"):
            need(getattr(self, name) >= 1, f"--{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        for name in ("max_steps", "checkpoint_every", "limit_train", "limit_test", "batch_size", "global_batch_size",
                     "tensor_parallel_size"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{_flag(name)} must be >= 1 or unset (got {value})")
        need(self.num_workers >= 0, f"--num-workers must be >= 0 (got {self.num_workers})")
        need(self.output_dir is None or "tensorboard" not in self.trackers()
             or readable(self.output_dir) == self.output_dir,
             f"--output-dir {readable(self.output_dir or '')} is not a valid UTF-8 name, and TensorBoard's writer "
             f"cannot write under it; rename it, choose another, or leave tensorboard out of --report-to")
        synthetic_bytes = (self.synthetic_train_size + self.synthetic_test_size) * 28 * 28 * 2  # file + tensor
        need(self.dataset != "synthetic" or synthetic_bytes <= memory_bytes() / 2,
             f"--synthetic-train-size {self.synthetic_train_size} and --synthetic-test-size "
             f"{self.synthetic_test_size} need about {synthetic_bytes / 1e9:.1f} GB of memory (28 x 28 bytes per "
             f"image, written and then read), more than half of this machine's {memory_bytes() / 1e9:.1f} GB; "
             f"choose smaller sizes")
        need(0 <= self.seed < 2**32, f"--seed must be in 0 .. 2**32 - 1 (got {self.seed})")
        need(self.lr > 0 and math.isfinite(self.lr),
             f"--lr must be a positive finite number (got {self.lr}); the reference run uses 1e-3")
        problems += self._optimization_problems()
        problems += self._monitoring_problems()
        need(self.image_size >= 64, f"--image-size must be >= 64 so AlexNet's feature map stays at least "
                                    f"1x1 before pooling (got {self.image_size})")
        need(self.image_size <= 1024, f"--image-size must be <= 1024 (got {self.image_size}): the images are 28x28, "
                                      f"and AlexNet's activations grow with the square of the side")
        need(self.collective_timeout > 0 and math.isfinite(self.collective_timeout),
             f"--collective-timeout must be a positive number of seconds (got {self.collective_timeout})")
        need(not self.collective_timeout > MAX_COLLECTIVE_TIMEOUT,
             f"--collective-timeout must be at most {MAX_COLLECTIVE_TIMEOUT:g} s (about 31 years; the process "
             f"group's clock counts nanoseconds in 64 bits) (got {self.collective_timeout:g})")
        need(0 < self.tracker_timeout <= 300, f"--tracker-timeout must be in (0, 300] seconds (got "
                                              f"{self.tracker_timeout:g})")
        need(self.checkpoint_minutes is None or self.checkpoint_minutes > 0,
             f"--checkpoint-minutes must be positive (got {self.checkpoint_minutes})")
        need(0 < self.model_width <= 4, f"--model-width must be in (0, 4] (got {self.model_width})")
        need(self.keep_checkpoints >= 2, f"--keep-checkpoints must be >= 2 so a previous checkpoint survives "
                                         f"while a new one is written (got {self.keep_checkpoints})")
        need(self.ddp_bucket_mb >= 1, f"--ddp-bucket-mb must be >= 1 (got {self.ddp_bucket_mb})")
        need(0 <= self.random_erasing <= 1, f"--random-erasing must be a probability in [0, 1] (got {self.random_erasing})")
        need(self.consistency_every >= 0, f"--consistency-every must be >= 0 (got {self.consistency_every})")
        need(self.straggler_factor == 0 or self.straggler_factor > 1,
             f"--straggler-factor must be above 1, or 0 to turn it off (got {self.straggler_factor})")
        need(self.tensor_parallel_size is None or self.parallelism == "hybrid",
             f"--tensor-parallel-size is for --parallelism hybrid (this run uses {self.parallelism})")
        need(self.parallelism != "fsdp" or self.ddp_comm_hook == "none",
             "--ddp-comm-hook compresses DDP's all-reduce, and --parallelism fsdp has none (it reduce-scatters "
             "fp32 gradients); leave it out, or use --parallelism ddp")
        need(not (self.augment and self.pipeline != "device"),
             "--augment works on the device pipeline's uint8 batches; use --pipeline device or drop --augment")
        need(self.resume in ("auto", "none") or bool(self.resume),
             "--resume must be auto, none or a checkpoint directory")
        if self.mixed_precision == "fp16" and not use_cuda():
            problems.append("--mixed-precision fp16 needs a CUDA GPU and none is usable here; "
                            "use --mixed-precision bf16 (works on CPU) or no")
        if problems:
            raise ConfigError("\n".join(problems))
        return self

    def _optimization_problems(self) -> list[str]:
        problems = []

        def need(ok: bool, message: str):
            if not ok:
                problems.append(message)

        need(self.batch_size is None or self.global_batch_size is None,
             f"give --batch-size (per process) or --global-batch-size (all processes together), not both "
             f"(got {self.batch_size} and {self.global_batch_size})")
        need(not (self.warmup_steps is not None and self.warmup_epochs is not None),
             "give --warmup-steps or --warmup-epochs, not both")
        need(self.warmup_steps is None or self.warmup_steps >= 0,
             f"--warmup-steps must be >= 0 (got {self.warmup_steps})")
        need(self.warmup_epochs is None or 0 <= self.warmup_epochs < self.epochs,
             f"--warmup-epochs must be >= 0 and shorter than the run's --epochs {self.epochs} "
             f"(got {self.warmup_epochs})")
        need(self.min_lr >= 0 and (self.min_lr < self.lr or not self.lr > 0),  # a bad --lr has its own message
             f"--min-lr must be >= 0 and below --lr {self.lr:g} (got {self.min_lr:g})")
        need(self.min_lr == 0 or self.lr_schedule != "constant",
             "--min-lr is where a cosine or onecycle schedule ends; add --lr-schedule cosine or drop --min-lr")
        if self.optimizer != "sgd":
            need(self.momentum is None, f"--momentum is for --optimizer sgd (this run uses {self.optimizer})")
            need(not self.nesterov, f"--nesterov is for --optimizer sgd (this run uses {self.optimizer})")
        need(self.momentum is None or 0 <= self.momentum < 1, f"--momentum must be in [0, 1) (got {self.momentum})")
        need(not (self.nesterov and self.momentum == 0), "--nesterov needs a --momentum above 0")
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay),
             f"--weight-decay must be >= 0 (got {self.weight_decay})")
        need(self.grad_clip is None or (self.grad_clip > 0 and math.isfinite(self.grad_clip)),
             f"--grad-clip must be a positive number (got {self.grad_clip})")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1) (got {self.dropout})")
        need(self.ema_decay is None or 0 < self.ema_decay < 1,
             f"--ema-decay must be in (0, 1), e.g. 0.999 (got {self.ema_decay})")
        return problems

    def _monitoring_problems(self) -> list[str]:
        problems = []
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        unknown = [name for name in names if name not in TRACKERS and name not in ("all", "none")]
        if unknown or not names:
            problems.append(f"--report-to {self.report_to!r}: give tensorboard, mlflow, wandb, all or none, or a "
                            f"comma list of the first three")
        elif len(names) > 1 and {"all", "none"} & set(names):  # "none,tensorboard": which one is meant?
            problems.append(f"--report-to {self.report_to!r}: all and none stand alone; give one of them, or a "
                            f"comma list of tensorboard, mlflow, wandb")
        for name in self.trackers():
            module = TRACKERS[name]
            if module and importlib.util.find_spec(module) is None:
                problems.append(f"--report-to {name} needs the {name} extra: pip install 'dist-alexnet[{name}]'")
        if self.profile_steps is not None:
            try:
                first, last = (int(part) for part in self.profile_steps.split(":"))
                assert 1 <= first <= last
            except (ValueError, AssertionError):
                problems.append(f"--profile-steps must be A:B with 1 <= A <= B, optimizer steps (got "
                                f"{self.profile_steps!r})")
            else:  # the end of the run in steps is known here only through --max-steps (Schedule checks the rest)
                if self.max_steps is not None and last > self.max_steps:
                    problems.append(f"--profile-steps {self.profile_steps} ends after the run's last step "
                                    f"(--max-steps {self.max_steps}); profile steps up to {self.max_steps}")
        return problems

    def trackers(self) -> list[str]:
        """--report-to as tracker names: all = every one, none = none."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if "none" in names:
            return []
        return list(TRACKERS) if "all" in names else [name for name in TRACKERS if name in names]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Past this, the process group's timeout overflows (torch keeps it in nanoseconds, a signed 64-bit count: 9.2e9 s).
MAX_COLLECTIVE_TIMEOUT = 1e9

# The trackers --report-to knows, and the module each needs (TensorBoard always comes with dist-alexnet).
TRACKERS = {"tensorboard": None, "mlflow": "mlflow", "wandb": "wandb"}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    """--mixed-precision, else what `accelerate launch` was told (it exports ACCELERATE_MIXED_PRECISION)."""
    return cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def _field_type(f: dataclasses.Field) -> type:
    """The concrete type of a field: int for `int | None`, and so on."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if _optional(f):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _optional(f: dataclasses.Field) -> bool:
    """Whether the field may be unset (None)."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return is_union and type(None) in typing.get_args(hint)


def _coerce(name: str, value, kind: type, optional: bool, source: str):
    """Check a YAML value's type (ints are fine where a float is wanted); raise ConfigError otherwise."""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got an empty value (null, ~); give a value "
                          f"or remove the key")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is str and isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be text, and YAML 1.1 reads an unquoted no/yes/off/on/false/true "
                          f"as the boolean {value}; put the value in quotes (e.g. {name}: 'no')")
    raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (again on line "
                                                        f"{key_node.start_mark.line + 1}); keep one of them",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; is it a YAML file?") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, "
                          f"not a {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if name in values:  # image_size and image-size: one option given twice
            twin = next(k for k in data if str(k).replace("-", "_") == name)
            raise ConfigError(f"config file {path}: {twin!r} and {key!r} are the same option; keep one of them")
        values[name] = _coerce(name, value, _field_type(known[name]), _optional(known[name]), f"config file {path}")
    return values


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                  overrides: dict[str, dict] | None = None) -> None:
    """One --flag per TrainConfig field (or per field named in `only`, then without --config), with the field's
    type, choices and help. Unset flags stay absent so YAML (or checkpoint) values are not overridden.
    `overrides`: per field, the argparse settings (default, choices, help) a subcommand gives it instead of the
    field's, e.g. scaling-model's --batch-size 512; a flag given a default there is always set."""
    if only is None:
        parser.add_argument("--config", help="YAML file of options (command-line flags override it)")
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        kind = _field_type(f)
        settings = {"default": argparse.SUPPRESS, "choices": f.metadata.get("choices"), "help": f.metadata["help"],
                    **(overrides or {}).get(f.name, {})}
        shown = f.default if settings["default"] is argparse.SUPPRESS else settings["default"]
        settings["help"] += f" (default: {shown})"
        if kind is bool:
            del settings["choices"]
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, action=argparse.BooleanOptionalAction, **settings)
        else:
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, type=kind,
                                metavar=None if settings["choices"] else f.name.upper(), **settings)


def config_from_args(args: argparse.Namespace, only: tuple[str, ...] | None = None,
                     validate: bool = True) -> TrainConfig:
    """The options given on the command line, over --config's YAML, over the defaults. `only`: take these fields
    alone from `args` (a subcommand's own flags may share a field's name: benchmark's --global-batch-size)."""
    config = getattr(args, "config", None)
    if config is not None and not config.strip():
        raise ConfigError("--config is empty (an unset variable in a job script?); give a YAML file or leave the "
                          "option out")
    values = load_yaml(expand_path(config)) if config else {}
    names = set(only) if only is not None else {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    for name in PATH_OPTIONS:  # as a shell would have, had the path not come from YAML or quotes
        if isinstance(values.get(name), str) and values[name] not in ("auto", "none"):
            values[name] = expand_path(values[name])
    cfg = TrainConfig(**values)
    return cfg.validate() if validate else cfg


def check_output_file(path: str | None, option: str = "--json") -> None:
    """Before a long measurement: the file it will write can be written (not a directory, its folder creatable
    and writable), so the result is not lost at the end."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file path (e.g. {target / 'result.json'})")
    folder = target.parent
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"{option} {path}: {existing} is not a writable folder; choose another path")


def readable(text: str) -> str:
    """A file name as text any writer takes: the bytes of a name that is not valid UTF-8 (Python holds them as
    surrogate escapes) shown as \\xNN, e.g. caf\\xe9 for a Latin-1 "café"; valid text unchanged."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) else text


def readable_options(cfg) -> dict:
    """cfg.to_dict() with every text value readable(): what trackers, TensorBoard text and hparams are given."""
    return {key: readable(value) if isinstance(value, str) else value for key, value in cfg.to_dict().items()}


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The options that name a file or folder: `~` and $VARIABLES in them are expanded (resume's auto and none aside).
PATH_OPTIONS = ("data_dir", "output_dir", "resume")


def expand_path(path: str) -> str:
    """`~` and $VARIABLE / ${VARIABLE} expanded; a variable that is not set is an error, not a literal `$NAME`."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    if "$" in expanded and re.search(r"\$\{?[A-Za-z_]", expanded):
        raise ConfigError(f"{path!r} names an environment variable that is not set ({expanded}); set it or write "
                          f"the path out")
    return expanded


def resume_changes(saved: dict, cfg: TrainConfig, mid_epoch: bool, checkpoint) -> list[str]:
    """Compare this run's options with those `checkpoint` was trained with (`saved`): a log line for each that
    applies from here on; ConfigError for one a resume cannot take, saying how to go on."""
    current = cfg.to_dict()
    rules = {f.name: f.metadata["resume"] for f in dataclasses.fields(TrainConfig)}
    changed = {name: (saved[name], current[name]) for name in current
               if name in saved and saved[name] != current[name] and rules[name] != SILENT}
    for name, (old, new) in changed.items():
        kind, why = rules[name] if isinstance(rules[name], tuple) else (rules[name], None)
        if kind == "refused" or (kind == "refused mid-epoch" and mid_epoch):
            old_flag = f"--{_flag(name)} {old}" if old is not None else f"no --{_flag(name)}"
            raise ConfigError(f"--{_flag(name)} is {new} but {checkpoint} was trained with {old}: {why}; "
                              f"resume with {old_flag}, or start a new run in another --output-dir")
    return [f"--{_flag(name)} {old} -> {new}" for name, (old, new) in changed.items()]


def save_yaml(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """The run's config.yaml, replaced whole (a temporary file renamed over it); ConfigError naming it when it
    cannot be written (a directory of that name, an unwritable run directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(21, "Is a directory")  # os.replace would say only "Is a directory" for tmp
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot write {path} ({err.strerror or err}): the run directory's config.yaml must be a "
                          f"file it can replace; move that entry away, or choose another --output-dir") from None
