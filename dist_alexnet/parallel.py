"""How the model is spread over the processes: --parallelism ddp or hybrid.

ddp: every rank holds the whole model; Accelerate's DDP all-reduces every gradient (233 MB of fp32 for AlexNet)
during backward.

hybrid: Krizhevsky's "one weird trick" (arXiv:1404.5997), written for this network. The convolutions (6% of the
weights, most of the compute) stay data-parallel over all ranks under Accelerate's DDP. The classifier (94% of
the weights, little compute) is split over a tensor-parallel group of --tensor-parallel-size ranks, by default
the processes of one node:

    features of my B examples      all-gather in the group  ->  [T x B, 9216], every rank the group's batch
    fc1, column-parallel           my 4096/T output units for all T x B examples; ReLU, dropout
    fc2, row-parallel              partial sums over my 4096/T inputs  ->  reduce-scatter: my B examples' [B, 4096]
    + fc2's bias, ReLU, dropout, fc3: replicated, data-parallel like the convolutions

Backward runs the same collectives the other way (the gradient of an all-gather is a reduce-scatter). Each
step moves about 2 x T x B x (9216 + 4096) activations instead of the classifier's 54.6M gradients, and each
rank keeps 1/T of the classifier's weights, gradients and Adam state. Across the world / T groups (nodes) only
the shards' gradients are all-reduced, among the ranks that hold the same shard; that all-reduce starts as soon
as backward has finished the classifier and runs behind the convolutions' backward.

Every (example, unit) of the first dropout is drawn once, by the rank that owns the unit, and each example's
second dropout by the rank that owns the example, each rank from its own stream (seeded per rank). Checkpoints
hold the full, unsharded model and optimizer state in the ddp layout (full_state_dict gathers the shards), so a
checkpoint moves between ddp and hybrid and between world sizes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from dist_alexnet.errors import ConfigError
from dist_alexnet.model import channel_widths

# The classifier's split parameters and the dimension each is split along (AlexNet.classifier's layout:
# 0 Flatten, 1 fc1, 2 ReLU, 3 Dropout, 4 fc2, 5 ReLU, 6 Dropout, 7 fc3).
SHARDED = {"classifier.1.weight": 0, "classifier.1.bias": 0, "classifier.4.weight": 1}


def make_parallelism(cfg, accelerator) -> DataParallel | HybridParallel:
    """The --parallelism of the run, checked against the world it runs in."""
    if cfg.parallelism == "ddp":
        return DataParallel(accelerator)
    world = accelerator.num_processes
    tp = cfg.tensor_parallel_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    hidden = channel_widths(cfg.model_width)[-1]
    problems = []
    if world < 2:
        problems.append("--parallelism hybrid splits the classifier over several processes and this run has one; "
                        "launch it with accelerate launch / torchrun, or use --parallelism ddp")
    elif world % tp:
        problems.append(f"--tensor-parallel-size {tp} does not divide the {world} processes; choose a divisor of "
                        f"{world} (the processes of one node are the natural choice)")
    elif hidden % tp:
        problems.append(f"--model-width {cfg.model_width:g} gives a hidden width of {hidden}, which "
                        f"{tp} tensor-parallel ranks cannot split evenly; choose a width whose 4096 x width divides "
                        f"by {tp} (1.0, 0.5, 0.25, 0.125, ...)")
    if cfg.compile:
        problems.append("--compile with --parallelism hybrid: torch.compile would trace the classifier's "
                        "collectives, which this trainer does not support; use one of the two")
    if accelerator.mixed_precision == "fp16":
        problems.append("--mixed-precision fp16 with --parallelism hybrid: fp16's loss scaler decides on each rank "
                        "alone whether a step overflowed, and the ranks' classifier shards differ, so they could "
                        "disagree; use bf16")
    if problems:
        raise ConfigError("\n".join(problems))
    return HybridParallel(accelerator, tp)


# ----------------------------------------------------------------------------- ddp

class DataParallel:
    """--parallelism ddp: the whole model on every rank; Accelerate's DDP does everything."""
    name = "ddp"
    tensor_parallel_size = 1
    sharded: tuple[str, ...] = ()  # the parameters each rank holds a part of

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.traffic = Traffic()

    def split(self, model: nn.Module) -> nn.Module:
        return model

    def after_backward(self, model) -> None:
        """Nothing: DDP all-reduced the gradients during backward."""

    def gradient_norm(self, model) -> torch.Tensor:
        """The L2 norm of the whole gradient as the optimizer will apply it (after DDP's averaging, without fp16's
        loss scale: unscaled here once; the optimizer step then does not unscale again). On the device: no sync."""
        self.accelerator.unscale_gradients()
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])

    def clip_gradients(self, model, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)  # unscales fp16 first

    def full_state_dict(self, model: nn.Module) -> dict:
        return self.accelerator.unwrap_model(model).state_dict()

    def load_full_state_dict(self, model: nn.Module, state: dict) -> None:
        self.accelerator.unwrap_model(model).load_state_dict(state)

    def full_optimizer_state(self, optimizer, model) -> dict:
        return optimizer.state_dict()

    def load_full_optimizer_state(self, optimizer, model, state: dict) -> None:
        optimizer.load_state_dict(state)

    def full_shape(self, name: str, shape: tuple) -> tuple:
        return tuple(shape)

    def replicated_parameters(self, model) -> list[torch.Tensor]:
        """The parameters every rank holds the same copy of."""
        return list(model.parameters())

    def describe(self) -> str:
        return "ddp (every rank the whole model)"


# ----------------------------------------------------------------------------- hybrid

class HybridParallel(DataParallel):
    """--parallelism hybrid: data-parallel convolutions, the classifier tensor-parallel over groups of
    tensor_parallel_size ranks (consecutive ranks: the processes of a node) and data-parallel across groups."""
    name = "hybrid"
    sharded = tuple(SHARDED)

    def __init__(self, accelerator, tensor_parallel_size: int):
        super().__init__(accelerator)
        world = accelerator.num_processes
        self.world = world
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = world // tensor_parallel_size
        # rows: data-parallel replicas of the classifier (nodes); columns: the ranks that split it
        self.mesh = init_device_mesh(accelerator.device.type, (self.data_parallel_size, tensor_parallel_size),
                                     mesh_dim_names=("dp", "tp"))
        self.tp_group, self.dp_group = self.mesh.get_group("tp"), self.mesh.get_group("dp")
        self.tp_rank = self.mesh.get_local_rank("tp")
        self.pending: list = []  # the shards' gradient all-reduces in flight
        self.eval_sizes: list[int] = []  # an evaluation batch's size on each rank: gather_batch -> scatter_batch_sum
        self.shard_grads: list[torch.Tensor] = []

    def split(self, model: nn.Module) -> nn.Module:
        """Replace the full classifier of `model` (the same initial weights on every rank) by this rank's shard,
        and keep DDP's hands off the shards: their gradients are summed over the tensor-parallel group by the
        collectives' backward, and over the data-parallel group by after_backward."""
        model.classifier = TensorParallelClassifier(model.classifier, self)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(SHARDED))
        for name in SHARDED:
            model.get_parameter(name).register_post_accumulate_grad_hook(self._start_shard_allreduce)
        return model

    def _start_shard_allreduce(self, param: torch.Tensor) -> None:
        """As soon as backward has a shard's gradient of an optimizer step (not a micro-batch inside a gradient-
        accumulation group), start summing it over the ranks that hold the same shard; the convolutions'
        backward runs meanwhile."""
        if not self.accelerator.sync_gradients:
            return
        self.shard_grads.append(param.grad)
        if self.data_parallel_size > 1:
            self.traffic.add("all-reduce", param.grad, self.data_parallel_size)
            self.pending.append(dist.all_reduce(param.grad, group=self.dp_group, async_op=True))

    def after_backward(self, model) -> None:
        """Wait for the shards' all-reduce and average like DDP: each shard's gradient is now the sum over all
        ranks' losses, DDP's gradients the mean."""
        started = time.perf_counter()
        for work in self.pending:
            work.wait()
        self.traffic.wait_seconds += time.perf_counter() - started
        if self.shard_grads:
            torch._foreach_mul_(self.shard_grads, 1 / self.world)
        self.pending, self.shard_grads = [], []

    def gradient_norm(self, model) -> torch.Tensor:
        """The whole gradient's L2 norm: the replicated part's, plus the shards' squares summed over the group."""
        self.accelerator.unscale_gradients()
        shards = set(self._sharded(model))
        replicated = [p.grad for p in model.parameters() if p.grad is not None and p not in shards]
        split = [p.grad for p in shards if p.grad is not None]
        squares = torch.nn.utils.get_total_norm(split).square() if split else torch.zeros((), device=self.device)
        dist.all_reduce(squares, group=self.tp_group)
        own = torch.nn.utils.get_total_norm(replicated).square() if replicated else 0
        return (squares + own).sqrt()

    def clip_gradients(self, model, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_'s rule (scale by max_norm / (norm + 1e-6) when above) on the whole
        gradient's norm, the same on every rank."""
        norm = self.gradient_norm(model)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    @property
    def device(self):
        return self.accelerator.device

    def _sharded(self, model) -> list[torch.Tensor]:
        model = self.accelerator.unwrap_model(model)
        return [model.get_parameter(name) for name in SHARDED]

    # --- checkpoints: the full model, in the ddp layout

    def _gather(self, shard: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(shard) for _ in range(self.tensor_parallel_size)]
        dist.all_gather(parts, shard.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim)

    def _own(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        return full.chunk(self.tensor_parallel_size, dim)[self.tp_rank].clone()

    def full_state_dict(self, model: nn.Module) -> dict:
        """Every rank calls it (the shards are gathered in each group): the unsharded state dict."""
        state = self.accelerator.unwrap_model(model).state_dict()
        return {name: self._gather(t.detach(), SHARDED[name]) if name in SHARDED else t for name, t in state.items()}

    def load_full_state_dict(self, model: nn.Module, state: dict) -> None:
        model = self.accelerator.unwrap_model(model)
        model.load_state_dict({name: self._own(t, SHARDED[name]) if name in SHARDED else t
                               for name, t in state.items()})

    def _optimizer_shards(self, optimizer, model) -> dict[int, int]:
        """optimizer.state_dict()'s parameter index of each shard -> its split dimension."""
        index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
        model = self.accelerator.unwrap_model(model)
        return {index[id(model.get_parameter(name))]: dim for name, dim in SHARDED.items()}

    def full_optimizer_state(self, optimizer, model) -> dict:
        state = optimizer.state_dict()
        for i, dim in self._optimizer_shards(optimizer, model).items():
            if i in state["state"]:
                state["state"][i] = {key: self._gather(value, dim) if torch.is_tensor(value) and value.dim() else value
                                     for key, value in state["state"][i].items()}
        return state

    def load_full_optimizer_state(self, optimizer, model, state: dict) -> None:
        state = {**state, "state": dict(state["state"])}
        for i, dim in self._optimizer_shards(optimizer, model).items():
            if i in state["state"]:
                state["state"][i] = {key: self._own(value, dim) if torch.is_tensor(value) and value.dim() else value
                                     for key, value in state["state"][i].items()}
        optimizer.load_state_dict(state)

    def full_shape(self, name: str, shape: tuple) -> tuple:
        shape = list(shape)
        if name in SHARDED:
            shape[SHARDED[name]] *= self.tensor_parallel_size
        return tuple(shape)

    def replicated_parameters(self, model) -> list[torch.Tensor]:
        shards = set(self._sharded(model))
        return [p for p in model.parameters() if p not in shards]

    def describe(self) -> str:
        return (f"hybrid (convolutions data-parallel over {self.world} ranks; the classifier split over "
                f"{self.tensor_parallel_size} ranks, data-parallel over {self.data_parallel_size} group(s))")


class TensorParallelClassifier(nn.Sequential):
    """AlexNet's classifier with fc1 split by output units and fc2 by input units; the same children and
    parameter names as the full one (state dict keys classifier.N.*), each shard 1/T of the full tensor."""

    def __init__(self, full: nn.Sequential, parallel: HybridParallel):
        super().__init__(*full)
        self.parallel = [parallel]  # a list: not a submodule
        fc1, fc2 = self[1], self[4]
        T, rank = parallel.tensor_parallel_size, parallel.tp_rank
        fc1.weight = nn.Parameter(fc1.weight.detach().chunk(T, 0)[rank].clone())
        fc1.bias = nn.Parameter(fc1.bias.detach().chunk(T, 0)[rank].clone())
        fc2.weight = nn.Parameter(fc2.weight.detach().chunk(T, 1)[rank].clone())
        fc1.out_features, fc2.in_features = fc1.weight.shape[0], fc2.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parallel = self.parallel[0]
        fc1, fc2, fc3 = self[1], self[4], self[7]
        x = gather_batch(self[0](x), parallel)  # [T x B, c5 x 36]: the group's examples
        x = self[3](self[2](fc1(x)))  # my units of all of them
        x = scatter_batch_sum(F.linear(x, fc2.weight), parallel) + fc2.bias  # my examples, all units
        return fc3(self[6](self[5](x)))


# ----------------------------------------------------------------------------- the collectives

@dataclass
class Traffic:
    """Bytes this rank sent and seconds it waited in the hybrid step's collectives, counted as the ring
    algorithms that NCCL and gloo use send them: an all-reduce of S bytes over n ranks sends 2(n-1)/n x S, an
    all-gather or reduce-scatter of S bytes in all (n-1)/n x S."""
    sent: dict = field(default_factory=dict)
    wait_seconds: float = 0.0  # in the blocking collectives and waiting for the shards' all-reduce

    def add(self, kind: str, tensor: torch.Tensor, ranks: int) -> None:
        self.add_bytes(kind, tensor.numel() * tensor.element_size(), ranks)

    def add_bytes(self, kind: str, nbytes: float, ranks: int) -> None:
        factor = 2 * (ranks - 1) / ranks if kind == "all-reduce" else (ranks - 1) / ranks
        self.sent[kind] = self.sent.get(kind, 0.0) + factor * nbytes

    def reset(self) -> None:
        self.sent, self.wait_seconds = {}, 0.0


def _all_gather(x: torch.Tensor, parallel: HybridParallel) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * parallel.tensor_parallel_size, *x.shape[1:]))
    parallel.traffic.add("all-gather", out, parallel.tensor_parallel_size)
    started = time.perf_counter()
    dist.all_gather_single(out, x.contiguous(), group=parallel.tp_group)
    parallel.traffic.wait_seconds += time.perf_counter() - started
    return out


def _reduce_scatter(x: torch.Tensor, parallel: HybridParallel) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // parallel.tensor_parallel_size, *x.shape[1:]))
    parallel.traffic.add("reduce-scatter", x, parallel.tensor_parallel_size)
    started = time.perf_counter()
    dist.reduce_scatter_single(out, x.contiguous(), group=parallel.tp_group)
    parallel.traffic.wait_seconds += time.perf_counter() - started
    return out


class _GatherBatch(torch.autograd.Function):
    """Forward: the group's batches stacked in rank order. Backward: each rank gets the sum over the group of
    the gradients for its own examples."""

    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return _all_gather(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.parallel), None


class _ScatterBatchSum(torch.autograd.Function):
    """Forward: the group's partial sums added up, each rank keeping its own examples' rows. Backward: every
    rank gets the gradients of the whole group's examples."""

    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return _reduce_scatter(x, parallel)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.parallel), None


def gather_batch(x: torch.Tensor, parallel: HybridParallel) -> torch.Tensor:
    """[B, ...] on each rank of the group -> [T x B, ...]. Training batches are the same size on every rank; in
    an evaluation (no gradients) the last batches may differ, so they are padded to the largest."""
    if torch.is_grad_enabled():
        return _GatherBatch.apply(x, parallel)
    sizes = _all_gather(torch.tensor([x.shape[0]], device=x.device), parallel).tolist()
    parallel.eval_sizes = sizes
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:x.shape[0]] = x
    return _all_gather(padded, parallel)


def scatter_batch_sum(x: torch.Tensor, parallel: HybridParallel) -> torch.Tensor:
    """The inverse of gather_batch's layout: [T x B, ...] partial sums -> [B, ...] summed over the group."""
    if torch.is_grad_enabled():
        return _ScatterBatchSum.apply(x, parallel)
    sizes = parallel.eval_sizes
    return _reduce_scatter(x, parallel)[:sizes[parallel.tp_rank]]
