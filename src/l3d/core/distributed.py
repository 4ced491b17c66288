"""Data parallelism over torch.distributed: which rows of a global batch a rank owns, and the
collectives a step needs (docs/distributed.md). No I/O: joining a process group is the caller's.

Without a process group (or with one of a single rank) there is no `Group`, and every caller takes
its single-process path, free of collectives. Every rank runs the same steps on the same global
batches and holds identical factors; a rank computes the gradients of its shard of each batch, and
  - gathers |c| and ||g_i||^2 of all N samples, so batch top-k keeps exactly round(k N) over the
    whole batch and the loss normalisers are the whole batch's;
  - sums the factor gradients and the losses' shares (one all-reduce), so every rank takes the same
    AdamW step and unit-norm projection as a single process on the whole batch would.

With sharded factors (`shard_`), FSDP2 keeps each rank's range of subnetworks (dim 0 of every
factor) and their AdamW moments; the step's call gathers all factors and its backward
reduce-scatters their gradients (sums, as above), so each rank steps and normalises its own range.
`full` and `set_full_` read and write such a sharded tensor as a whole.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from l3d.errors import L3DError


class RankLost(L3DError):
    """A collective failed: another rank stopped (killed, crashed, or failed on its own error)."""


@dataclass(frozen=True)
class Group:
    """The default process group as seen by this rank."""

    rank: int
    size: int
    device: torch.device | None
    """Where collectives run: the rank's GPU under a NCCL-only group, else each tensor's own
    device (gloo, or a 'cpu:gloo,cuda:nccl' group)."""

    @classmethod
    def current(cls) -> Group | None:
        """The initialised default group, or None without one (or with a single rank)."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        nccl_only = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl_only else None
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous rows of n: sizes differ by at most one; ranks in order."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def gather_rows(self, x: Tensor) -> tuple[Tensor, slice]:
        """(n_rank, ...) on every rank -> (N, ...) all ranks' rows in rank order, and this rank's
        rows in it. Ranks may hold different numbers of rows (per-token samples, empty shards)."""
        sizes = self._all_gather(torch.tensor([x.shape[0]]))
        counts = [int(s) for s in sizes]
        padded = x.new_zeros(max(counts), *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = self._all_gather(padded)
        start = sum(counts[: self.rank])
        rows = torch.cat([p[:n] for p, n in zip(parts, counts)])
        return rows, slice(start, start + x.shape[0])

    def all_reduce_sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """Elementwise sums over ranks of same-shaped tensors, in one collective (one flat
        buffer of the first tensor's dtype)."""
        flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
        total = self._all_reduce(flat)
        return [
            part.view_as(t).to(t.dtype)
            for part, t in zip(total.split([t.numel() for t in tensors]), tensors)
        ]

    def barrier(self, ok: bool = True) -> bool:
        """Wait for every rank; True when all of them passed ok=True."""
        flags = self._all_reduce(torch.tensor([0 if ok else 1]))
        return int(flags[0]) == 0

    def check_same(self, values: Tensor, what: str) -> None:
        """An L3DError on every rank unless all ranks hold the same `values` (a fingerprint)."""
        every, _ = self.gather_rows(values.detach().double().flatten()[None])
        other = next((r for r in range(self.size) if not torch.equal(every[r], every[0])), None)
        if other is not None:
            raise L3DError(
                f"rank {other} holds other {what} than rank 0: every rank must build the same "
                "model, data and config (seed any random initialisation)"
            )

    @contextlib.contextmanager
    def lead_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, the other ranks once it has succeeded (so they may read
        what it wrote); its failure stops the others with a RankLost that points to it."""
        if not self.lead:
            if not self.barrier():
                raise RankLost(f"rank 0 failed (see its message); rank {self.rank} stops too")
            yield
            return
        try:
            yield
        except BaseException:
            with contextlib.suppress(RankLost):
                self.barrier(ok=False)
            raise
        self.barrier()

    def _all_gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's `x` (all the same shape), on x's device."""
        home, x = x.device, self._on_group(x)
        out = [torch.empty_like(x) for _ in range(self.size)]
        with self._guard():
            dist.all_gather(out, x)
        return [o.to(home) for o in out]

    def _all_reduce(self, x: Tensor) -> Tensor:
        """The sum of every rank's `x`, a tensor of the caller's own (summed in place)."""
        home, x = x.device, self._on_group(x)
        with self._guard():
            dist.all_reduce(x)
        return x.to(home)

    def _on_group(self, x: Tensor) -> Tensor:
        return x if self.device is None else x.to(self.device)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """A failed collective as one L3DError."""
        try:
            yield
        except RuntimeError as err:  # DistBackendError, DistNetworkError: a peer went away
            raise RankLost(
                f"rank {self.rank} of {self.size} lost contact with the other ranks "
                f"({_reason(err)}): another rank stopped or failed; see its message"
            ) from None


def fingerprint(tensors: list[Tensor]) -> Tensor:
    """(3,) float64: the number of tensors, and tensor-weighted sums of their sums and
    row-weighted sums (reordered rows differ). Fixed length, so that ranks holding other numbers
    of tensors still compare (`Group.check_same`; a gather of other lengths aborts gloo)."""
    sums = torch.zeros(2, dtype=torch.float64)
    for j, t in enumerate(tensors, start=1):
        t = t.detach()
        rows = t.reshape(len(t), -1).sum(1, dtype=torch.float64) if t.dim() else t.double()
        order = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
        sums += j * torch.stack([rows.sum(), (rows.flatten() * order).sum()]).cpu()
    return torch.cat([torch.tensor([float(len(tensors))], dtype=torch.float64), sums])


def shard_(module: nn.Module, group: Group) -> FSDPModule:
    """Shard `module`'s parameters over the group's ranks with FSDP2, on dim 0 (the subnetwork
    axis of every factor, so a rank holds whole subnetworks). Its gradients are summed over
    ranks, not averaged: each rank's loss is its share of the whole batch's."""
    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (group.size,))
    sharded = fully_shard(module, mesh=mesh)
    sharded.set_gradient_divide_factor(1.0)
    sharded.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return sharded


def full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded one (a collective: every rank calls it); others as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: Tensor, template: Tensor) -> Tensor:
    """`value` (whole) laid out as `template`: a copy of this rank's shard when that is sharded
    (a copy: the shard is trained in place and must not write into `value`)."""
    if not isinstance(template, DTensor):
        return value
    if value.dim() == 0:  # AdamW's step count: not sharded
        return value.clone()
    value = value.to(template.device)
    shard = distribute_tensor(value, template.device_mesh, template.placements, src_data_rank=None)
    return shard.clone()


@torch.no_grad()
def set_full_(t: Tensor, value: Tensor) -> None:
    """Write the whole `value` into `t`; a sharded `t` takes its own rows of it."""
    if isinstance(t, DTensor):
        t.to_local().copy_(cast(DTensor, like(value, t)).to_local())
    elif t is not value:
        t.copy_(value)


def _reason(err: Exception) -> str:
    """The first sentence of a backend's error, without gloo's '[file:line]' prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())
    return text.split(". ")[0].splitlines()[0] if text else type(err).__name__
