"""What the ranks check about each other while training: that their replicated weights are still the same, and
whether one rank is persistently slower than the others.

Data parallelism assumes every rank applies the same update to the same weights. A bit flip in a GPU's memory,
a non-deterministic kernel that differs between ranks, or a rank that skipped an update leaves the ranks training
different models, and nothing fails: the all-reduce averages gradients of different models without complaint.
Every --consistency-every steps the ranks compare a checksum of their replicated parameters (under --parallelism
hybrid: the convolutions and the classifier's replicated layers) and stop with one line at the first difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_alexnet.distributed import phase
from dist_alexnet.errors import ReplicasDiverged


@torch.no_grad()
def parameter_checksums(params: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum and sum of absolute values, in float64 (one pass over the weights; on the device)."""
    flat = [p.detach().double() for p in params]
    return torch.stack([torch.stack([p.sum(), p.abs().sum()]) for p in flat]).flatten()


@phase("the ranks' weight consistency check")
def check_replicas_agree(accelerator, parallel, model, step: int) -> None:
    """Every rank calls it: the replicated parameters' checksums gathered to every rank and compared with rank 0's;
    a difference stops every rank with one line naming the first rank and tensor that differ."""
    model = accelerator.unwrap_model(model)
    named = [(name, p) for name, p in model.named_parameters() if name not in parallel.planned]
    if not named:  # fsdp: no rank holds a copy of another's parameters
        return
    local = parameter_checksums([p for _, p in named])
    rows = accelerator.gather(local.unsqueeze(0)).view(accelerator.num_processes, -1)
    different = (rows != rows[0]).view(accelerator.num_processes, len(named), 2).any(-1)  # [rank, tensor]
    if different.any():
        rank, tensor = (int(i) for i in different.nonzero()[0])
        name = named[tensor][0]
        raise ReplicasDiverged(f"after step {step}, rank {rank}'s copy of {name} differs from rank 0's (checksum "
                               f"{float(rows[rank, 2 * tensor]):.17g} vs {float(rows[0, 2 * tensor]):.17g}): the "
                               f"ranks no longer train the same model (a memory error, a non-deterministic kernel "
                               f"or a rank that skipped an update); resume from the last checkpoint, and if it "
                               f"happens again, check rank {rank}'s device")


@dataclass
class StragglerWatch:
    """At each log point, each rank's seconds of local work per step (its input, forward and loss: the part of a
    step that waits for no other rank); warns, naming the rank, when the slowest is more than `factor` times the
    fastest at `patience` log points in a row, and again only after it recovered."""
    factor: float
    patience: int = 3
    slow_in_a_row: dict = field(default_factory=dict)  # rank -> consecutive slow log points
    warned: set = field(default_factory=set)

    def observe(self, step: int, seconds_by_rank: list[float]) -> str | None:
        """The warning to give at this log point, if any."""
        if not self.factor or len(seconds_by_rank) < 2:
            return None
        fastest = min(seconds_by_rank)
        slow = {rank for rank, s in enumerate(seconds_by_rank) if s > self.factor * fastest > 0}
        self.slow_in_a_row = {rank: self.slow_in_a_row.get(rank, 0) + 1 for rank in slow}
        self.warned &= slow
        due = [rank for rank, count in self.slow_in_a_row.items() if count >= self.patience and rank not in self.warned]
        if not due:
            return None
        self.warned.update(due)
        ranks = ", ".join(f"rank {r} ({seconds_by_rank[r] * 1e3:.0f} ms)" for r in sorted(due))
        return (f"warning: straggler at step {step}: {ranks} slower than the fastest rank ({fastest * 1e3:.0f} ms) "
                f"by more than {self.factor:g}x in local work per step at {self.patience} log points in a row; every "
                f"step waits for it (a throttled or shared device, a slow input pipeline on that node)")
