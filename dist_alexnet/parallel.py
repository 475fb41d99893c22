"""How the model is spread over the processes: --parallelism ddp, hybrid or fsdp.

ddp: every rank holds the whole model; Accelerate's DDP all-reduces every gradient (233 MB of fp32 for AlexNet)
during backward.

hybrid: Krizhevsky's "one weird trick" (arXiv:1404.5997), as a plan for torch's tensor parallelism
(torch.distributed.tensor.parallel, the building block torchtitan's parallelize.py uses). The convolutions (6% of the
weights, most of the compute) stay data-parallel over all ranks under Accelerate's DDP. The classifier (94% of
the weights, little compute) is split over a tensor-parallel group of --tensor-parallel-size ranks, by default
the processes of one node:

    features of my B examples      all-gather in the group  ->  [T x B, 9216], every rank the group's batch
    fc1, column-parallel           my 4096/T output units for all T x B examples; ReLU, dropout
    fc2, row-parallel              partial sums over my 4096/T inputs  ->  reduce-scatter: my B examples' [B, 4096]
    + fc2's bias (whole on every rank of the group), ReLU, dropout, fc3 (data-parallel like the convolutions)

Backward runs the same collectives the other way (the gradient of an all-gather is a reduce-scatter). Each
step moves about 2 x T x B x (9216 + 4096) activations instead of the classifier's 54.6M gradients, and each
rank keeps 1/T of the classifier's weights, gradients and Adam state. Across the world / T groups (nodes) only
the plan's gradients are all-reduced, among the ranks that hold the same shard; that all-reduce starts as soon
as backward has finished the classifier and runs behind the convolutions' backward.

Every (example, unit) of the first dropout is drawn once, by the rank that owns the unit, and each example's
second dropout by the rank that owns the example, each rank from its own stream (seeded per rank). Checkpoints
hold the full, unsharded model and optimizer state in the ddp layout (torch.distributed.checkpoint's state_dict
API gathers and splits the shards), so a checkpoint moves between ddp and hybrid and between world sizes.

fsdp: torch's FSDP2 (fully_shard): every parameter, its gradient and its optimizer state split by rows over the
ranks of a node, replicated across nodes (HSDP). A layer's weights are all-gathered just before it computes and
freed after; its gradient is reduce-scattered as soon as backward has it. Each rank keeps 1/local-world of the
state; per step it sends about 1.5 x ddp's bytes (fc1's and fc2's weights all-gathered for forward and again
for backward, their gradients reduce-scattered: 3 x (n-1)/n x their bytes, where ddp's all-reduce sends 2 x).
Checkpoints, through the same state_dict API, are in the ddp layout too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from dist_alexnet.distributed import launcher_variables
from dist_alexnet.errors import ConfigError
from dist_alexnet.model import channel_widths

# The tensor-parallel plan of AlexNet.classifier (0 Flatten, 1 fc1, 2 ReLU, 3 Dropout, 4 fc2, 5 ReLU, 6 Dropout,
# 7 fc3): fc1 takes the batch split over the group (Shard(0)), all-gathers it and computes its share of the output
# units; fc2 takes its share of the input units and reduce-scatters the partial sums back to each rank's examples.
# Both hand plain local tensors to the ReLUs and dropouts, so each rank draws its own dropout masks.
TENSOR_PARALLEL_PLAN = {"1": ColwiseParallel(input_layouts=Shard(0)), "4": RowwiseParallel(output_layouts=Shard(0))}
# The parameters the plan splits and the dimension of each (fc2's bias stays whole on every rank).
SHARDED = {"classifier.1.weight": 0, "classifier.1.bias": 0, "classifier.4.weight": 1}
# The plan's parameters (DTensors), whose gradients it sums over the group; DDP leaves them to after_backward.
PLANNED = (*SHARDED, "classifier.4.bias")
FULL_STATE = StateDictOptions(full_state_dict=True)  # every rank gets the whole, unsharded tensors


def make_parallelism(cfg, accelerator) -> DataParallel:
    """The --parallelism of the run, checked against the world it runs in."""
    if cfg.parallelism == "ddp":
        return DataParallel(accelerator)
    world = accelerator.num_processes
    local_world = launcher_variables().get("LOCAL_WORLD_SIZE", world)
    problems = []
    if world < 2:
        problems.append(f"--parallelism {cfg.parallelism} spreads the model over several processes and this run has "
                        f"one; launch it with accelerate launch / torchrun, or use --parallelism ddp")
    if cfg.parallelism == "hybrid":
        tp = cfg.tensor_parallel_size or local_world
        hidden = channel_widths(cfg.model_width)[-1]
        if world >= 2 and world % tp:
            problems.append(f"--tensor-parallel-size {tp} does not divide the {world} processes; choose a divisor "
                            f"of {world} (the processes of one node are the natural choice)")
        elif world >= 2 and hidden % tp:
            problems.append(f"--model-width {cfg.model_width:g} gives a hidden width of {hidden}, which "
                            f"{tp} tensor-parallel ranks cannot split evenly; choose a width whose 4096 x width "
                            f"divides by {tp} (1.0, 0.5, 0.25, 0.125, ...)")
    if cfg.compile and cfg.parallelism == "hybrid":  # (tried with torch 2.14.1: AOTAutograd fails on the plan)
        problems.append("--compile with --parallelism hybrid: torch.compile cannot compile the tensor-parallel "
                        "plan's backward in this torch (AOTAutograd stops on the saved process group); use one of "
                        "the two")
    elif cfg.compile:  # (it ran here, but no test compares it with the eager step)
        problems.append("--compile with --parallelism fsdp is not supported yet (untested); use one of the two")
    if accelerator.mixed_precision == "fp16":
        problems.append(f"--mixed-precision fp16 with --parallelism {cfg.parallelism}: fp16's loss scaler decides "
                        f"on each rank alone whether a step overflowed, and the ranks hold different parts of the "
                        f"gradient, so they could disagree; use bf16")
    if problems:
        raise ConfigError("\n".join(problems))
    if cfg.parallelism == "hybrid":
        return HybridParallel(accelerator, tp)
    return FullyShardedParallel(accelerator, local_world if world % local_world == 0 else world)


# ----------------------------------------------------------------------------- ddp

class DataParallel:
    """--parallelism ddp: the whole model on every rank; Accelerate's DDP does everything."""
    name = "ddp"
    tensor_parallel_size = 1
    uses_ddp = True  # Accelerate wraps the model in DDP (fsdp shards it itself)
    planned: tuple[str, ...] = ()  # the parameters a tensor-parallel plan owns (DTensors), outside DDP

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

    def replicated_parameters(self, model) -> list[torch.Tensor]:
        """The parameters every rank holds the same copy of."""
        return list(model.parameters())

    def describe(self) -> str:
        return "ddp (every rank the whole model)"


# ----------------------------------------------------------------------------- the DTensor modes

class ShardedParallel(DataParallel):
    """What hybrid and fsdp share: parameters that are DTensors split over `shard_group` (and replicated across
    its copies), the whole gradient's norm from their parts, and checkpoints in the full ddp layout through
    torch.distributed.checkpoint's state_dict API."""

    def __init__(self, accelerator, shard_size: int, names: tuple[str, str]):
        super().__init__(accelerator)
        self.world = accelerator.num_processes
        # rows: the copies (nodes); columns: the ranks that split the parameters among them
        self.mesh = init_device_mesh(accelerator.device.type, (self.world // shard_size, shard_size),
                                     mesh_dim_names=names)
        self.shard_group = self.mesh.get_group(names[1])

    @property
    def device(self):
        return self.accelerator.device

    def gradient_norm(self, model) -> torch.Tensor:
        """The whole gradient's L2 norm: the squares of the split gradients summed over the shard group, plus the
        replicated ones' own."""
        self.accelerator.unscale_gradients()
        split, replicated = [], []
        for p in model.parameters():
            if p.grad is not None:
                is_split = isinstance(p, DTensor) and any(placement.is_shard() for placement in p.placements)
                (split if is_split else replicated).append(local(p.grad))
        squares = torch.nn.utils.get_total_norm(split).square() if split else torch.zeros((), device=self.device)
        dist.all_reduce(squares, group=self.shard_group)
        own = torch.nn.utils.get_total_norm(replicated).square() if replicated else 0
        return (squares + own).sqrt()

    def clip_gradients(self, model, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_'s rule (scale by max_norm / (norm + 1e-6) when above) on the whole
        gradient's norm, the same on every rank."""
        norm = self.gradient_norm(model)
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    # --- checkpoints: the full model, in the ddp layout (torch's state_dict API gathers and splits the DTensors)

    def full_state_dict(self, model: nn.Module) -> dict:
        """Every rank calls it (the parts are gathered from every rank): the unsharded state dict."""
        return get_model_state_dict(self.accelerator.unwrap_model(model), options=FULL_STATE)

    def load_full_state_dict(self, model: nn.Module, state: dict) -> None:
        set_model_state_dict(self.accelerator.unwrap_model(model), state, options=FULL_STATE)

    def full_optimizer_state(self, optimizer, model) -> dict:
        """optimizer.state_dict()'s layout with one parameter group over the model's parameters in order, as ddp
        saves it (in memory hybrid's DTensors have a group of their own: fused kernels take one kind)."""
        model = self.accelerator.unwrap_model(model)
        by_name = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=FULL_STATE)
        index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        group = {key: value for key, value in by_name["param_groups"][0].items() if key != "params"}
        return {"state": {index[name]: state for name, state in by_name["state"].items()},
                "param_groups": [{**group, "params": list(range(len(index)))}]}

    def load_full_optimizer_state(self, optimizer, model, state: dict) -> None:
        model = self.accelerator.unwrap_model(model)
        names = [name for name, _ in model.named_parameters()]
        name_of = {id(p): name for name, p in model.named_parameters()}
        saved = {key: value for key, value in state["param_groups"][0].items() if key != "params"}
        by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                   "param_groups": [{**saved, "params": [name_of[id(p)] for p in group["params"]]}
                                    for group in optimizer.param_groups]}
        set_optimizer_state_dict(model, _torch_optimizer(optimizer), by_name, options=FULL_STATE)

    def replicated_parameters(self, model) -> list[torch.Tensor]:
        return [p for p in model.parameters() if not isinstance(p, DTensor)]


# ----------------------------------------------------------------------------- hybrid

class HybridParallel(ShardedParallel):
    """--parallelism hybrid: data-parallel convolutions, the classifier tensor-parallel over groups of
    tensor_parallel_size ranks (consecutive ranks: the processes of a node) and data-parallel across groups."""
    name = "hybrid"

    def __init__(self, accelerator, tensor_parallel_size: int):
        super().__init__(accelerator, tensor_parallel_size, ("dp", "tp"))
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = self.world // tensor_parallel_size
        self.tp_group, self.dp_group = self.shard_group, self.mesh.get_group("dp")
        self.pending: list = []  # the plan's gradient all-reduces across groups in flight
        self.planned_grads: list[torch.Tensor] = []

    def split(self, model: nn.Module) -> nn.Module:
        """Apply the tensor-parallel plan to `model`'s classifier (the same initial weights on every rank: each
        keeps its shards), and keep DDP's hands off the plan's parameters (DTensors): their gradients are summed
        over the tensor-parallel group by the plan's collectives, and over the data-parallel group by
        after_backward."""
        classifier = model.classifier
        # the plan hands the ReLUs a view of its collective's output, which autograd forbids changing in place
        classifier[2].inplace = classifier[5].inplace = False
        parallelize_module(classifier, self.mesh["tp"], TENSOR_PARALLEL_PLAN)
        classifier.register_forward_pre_hook(self._before_classifier)
        classifier.register_forward_hook(self._after_classifier)
        planned = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
        self.planned = tuple(planned)
        # (no public way to tell DDP which parameters another mechanism synchronises)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, planned)
        for name in planned:
            model.get_parameter(name).register_post_accumulate_grad_hook(self._start_allreduce_across_groups)
        return model

    def _before_classifier(self, module, args):
        """Count the plan's traffic; in an evaluation (no gradients) pad this rank's batch to the group's largest:
        the plan's all-gather takes the same number of rows from every rank, and the ranks' last evaluation
        batches may differ."""
        features, = args
        rows = features.shape[0] * self.tensor_parallel_size
        hidden = module[1].weight.shape[0]
        gathered, scattered = rows * features[0].numel(), rows * hidden
        if torch.is_grad_enabled():  # the backward's reduce-scatter and all-gather move as much again
            gathered = scattered = gathered + scattered
        self.traffic.add_bytes("all-gather", gathered * features.element_size(), self.tensor_parallel_size)
        self.traffic.add_bytes("reduce-scatter", scattered * features.element_size(), self.tensor_parallel_size)
        if torch.is_grad_enabled():
            return None
        size = torch.tensor([features.shape[0]], device=features.device)
        sizes = size.new_empty(self.tensor_parallel_size)
        dist.all_gather_into_tensor(sizes, size, group=self.tp_group)
        self.eval_rows = features.shape[0]
        padded = features.new_zeros((int(sizes.max()), *features.shape[1:]))
        padded[:features.shape[0]] = features
        return (padded,)

    def _after_classifier(self, module, args, output):
        return output if torch.is_grad_enabled() else output[:self.eval_rows]

    def _start_allreduce_across_groups(self, param: torch.Tensor) -> None:
        """As soon as backward has a planned parameter's gradient of an optimizer step (not a micro-batch inside a
        gradient-accumulation group), start summing it over the ranks that hold the same shard; the
        convolutions' backward runs meanwhile."""
        if not self.accelerator.sync_gradients:
            return
        grad = local(param.grad)
        self.planned_grads.append(grad)
        if self.data_parallel_size > 1:
            self.traffic.add("all-reduce", grad, self.data_parallel_size)
            self.pending.append(dist.all_reduce(grad, group=self.dp_group, async_op=True))

    def after_backward(self, model) -> None:
        """Wait for the all-reduce across groups and average like DDP: each planned gradient is now the sum over
        all ranks' losses, DDP's gradients the mean."""
        started = time.perf_counter()
        for work in self.pending:
            work.wait()
        self.traffic.wait_seconds += time.perf_counter() - started
        if self.planned_grads:
            torch._foreach_mul_(self.planned_grads, 1 / self.world)
        self.pending, self.planned_grads = [], []

    def describe(self) -> str:
        return (f"hybrid (convolutions data-parallel over {self.world} ranks; the classifier split over "
                f"{self.tensor_parallel_size} ranks, data-parallel over {self.data_parallel_size} group(s))")


# ----------------------------------------------------------------------------- fsdp

class FullyShardedParallel(ShardedParallel):
    """--parallelism fsdp: torch's FSDP2 (fully_shard). Every parameter, its gradient and its Adam state are split
    by rows over the ranks of a node (shard_size: LOCAL_WORLD_SIZE) and replicated across nodes (HSDP; one node:
    plain FSDP). A layer's weights are all-gathered just before it computes and freed after; its gradient is
    reduce-scattered (averaged, as DDP averages) as soon as backward has it, then all-reduced across nodes."""
    name = "fsdp"
    uses_ddp = False

    def __init__(self, accelerator, shard_size: int):
        super().__init__(accelerator, shard_size, ("replicate", "shard"))
        self.shard_size = shard_size

    def split(self, model: nn.Module) -> nn.Module:
        """Shard fc1 and fc2 (94% of the weights) as units of their own, so that only one of them is whole at a
        time, and the rest of the model as one unit."""
        mesh = self.mesh if self.world > self.shard_size else self.mesh["shard"]  # a 2-D mesh: HSDP
        units_again = [model.classifier[1], model.classifier[4]]
        for layer in units_again:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.planned = tuple(name for name, _ in model.named_parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # (DTensor: the whole)
        self.gathered_again = sum(p.numel() * p.element_size() for layer in units_again for p in layer.parameters())
        model.register_forward_pre_hook(self._count_traffic)
        return model

    def _count_traffic(self, module, args) -> None:
        """FSDP2's collectives of this forward (and its backward), counted as the ring algorithms send them: every
        weight all-gathered for forward, fc1's and fc2's again for backward (the root unit stays whole between),
        every gradient reduce-scattered, then its shard all-reduced across the groups."""
        training = torch.is_grad_enabled()
        gathered = self.weight_bytes + (self.gathered_again if training else 0)
        self.traffic.add_bytes("all-gather", gathered, self.shard_size)
        groups = self.world // self.shard_size
        if training:
            self.traffic.add_bytes("reduce-scatter", self.weight_bytes, self.shard_size)
            if groups > 1:
                self.traffic.add_bytes("all-reduce", self.weight_bytes / self.shard_size, groups)

    def describe(self) -> str:
        nodes = self.world // self.shard_size
        across = f", replicated across {nodes} groups (HSDP)" if nodes > 1 else ""
        return f"fsdp (every parameter, gradient and Adam state split over {self.shard_size} ranks{across})"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's part on this rank (the same storage, outside autograd), any other tensor itself."""
    if not isinstance(tensor, DTensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def state_bytes(model, optimizer) -> dict:
    """Bytes of this rank's parameters, their gradients (one per parameter during a step) and the optimizer's
    state: what a rank holds besides activations (of a DTensor, this rank's part)."""
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    state = sum(local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    return {"parameters": params, "gradients": params, "optimizer_state": state, "total": 2 * params + state}


def _torch_optimizer(optimizer):
    """The torch optimizer inside Accelerate's wrapper: torch's state_dict API steps an optimizer without state
    to create it, which the wrapper may skip (gradient accumulation)."""
    return getattr(optimizer, "optimizer", optimizer)


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
