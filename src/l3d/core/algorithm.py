"""Algorithm 1 of the paper, the mathematics of one step: batch top-k, the reconstruction error
through the Gram identity, both losses, and evaluation. The trainer (trainer.py) runs the steps.

One training step (Section 2.4):
  c = V_in g                         coefficients, (n_s, n_v)
  mask = batch_top_k(|c|, k)         exactly round(k * n_s * n_v) entries over the whole batch
  g^ = V_out (c * mask)              never formed: its error comes from the Gram identity
  ||g - g^||^2 = ||g||^2 - 2 sum_k c_k d_k + c^T G c,   d = V_out g, G = V_out V_out^T
  loss = mean_i ||g_i - g^_i|| / ||g_i||  (paper, eq. 8)  or  sum ||g - g^||^2 / sum ||g||^2 (code)
  AdamW step on V_in, V_out; then V_out rows projected to unit L2 norm.

Under a process group (core/distributed.py) each rank holds a shard of the batch: `select` gathers
|c| and ||g_i||^2 of every rank, so the top-k and the normalisers are the whole batch's, and a
rank's `losses` are its share of the batch's (the trainer sums shares and gradients over ranks).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from l3d.core.distributed import Group
from l3d.core.gradients import (
    BatchMemory,
    ChunkedGradients,
    DenseGradients,
    GradientBatch,
    GradientSource,
)
from l3d.core.subnetworks import (
    Factorization,
    GramPrecision,
    Subnetworks,
    factor_numel,
    flat_gram,
    gram_bytes,
)
from l3d.errors import L3DError


def n_kept(top_k: float, n_coefficients: int) -> int:
    """Number of coefficients batch top-k keeps: round(k * N), at least 1."""
    return max(1, min(n_coefficients, round(top_k * n_coefficients)))


def batch_top_k(coeffs: Tensor, top_k: float) -> Tensor:
    """Bool mask (n_s, n_v) of the round(top_k * n_s * n_v) largest |c| over the whole batch.

    Exactly that many entries are kept; among equal magnitudes at the threshold, torch.topk's
    order decides (deterministic on CPU). The authors' code keeps floor(kN)+1 plus all ties.
    """
    flat = coeffs.detach().abs().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(n_kept(top_k, flat.numel())).indices] = True
    return mask.view_as(coeffs)


@dataclass(frozen=True)
class Selection:
    """The batch top-k of one step, over the whole batch (all ranks' shards)."""

    mask: Tensor
    """(n_s, n_v) bool: which of this rank's coefficients are kept."""
    batch_g_sq: Tensor
    """(N,) ||g_i||^2 of every sample of the batch: the loss normalisers."""
    active: Tensor
    """(n_v,) number of the batch's samples in which each subnetwork is kept."""
    n_samples: int
    """N, the batch's samples on all ranks."""


def select(c: Tensor, g_sq: Tensor, top_k: float, group: Group | None = None) -> Selection:
    """Batch top-k of c (n_s, n_v) over the whole batch: with a group, over the gathered |c| of
    every rank (exactly round(k N) of all N samples' coefficients), each rank keeping its rows."""
    if group is None:
        mask = batch_top_k(c, top_k)
        return Selection(mask, g_sq, mask.sum(0), c.shape[0])
    # One gather: |c| with ||g_i||^2 as an extra column, (N, n_v + 1).
    both, rows = group.gather_rows(torch.cat([c.detach().abs(), g_sq.detach()[:, None]], 1))
    mask_all = batch_top_k(both[:, :-1], top_k)
    return Selection(mask_all[rows], both[:, -1], mask_all.sum(0), both.shape[0])


def reconstruction_sq_errors(
    c: Tensor, d: Tensor, g_sq: Tensor, gram: Tensor, mask: Tensor
) -> Tensor:
    """||g_i - sum_{k in top-k(i)} c_ik V_out_k||^2 per sample, (n_s,), via docs/math.md
    section 4."""
    c_kept = c * mask
    cross = (c_kept * d).sum(1)
    quad = ((c_kept @ gram) * c_kept).sum(1)  # c^T G c per sample
    return (g_sq - 2 * cross + quad).clamp_min(0)


@dataclass(frozen=True)
class Losses:
    paper: Tensor
    """mean over samples of ||g_i - g^_i|| / ||g_i|| (eq. 8 per sample); zero-gradient samples
    skipped."""
    pooled_squared: Tensor
    """sum_i ||g_i - g^_i||^2 / sum_i ||g_i||^2: the authors' code, behind every published
    number."""

    def __add__(self, other: Losses) -> Losses:
        """Chunk shares of one batch add up to the batch's losses (see `losses`)."""
        return Losses(self.paper + other.paper, self.pooled_squared + other.pooled_squared)

    def detach(self) -> Losses:
        return Losses(self.paper.detach(), self.pooled_squared.detach())

    def get(self, name: str) -> Tensor:
        """The loss named as in L3DConfig.loss."""
        return self.paper if name == "paper" else self.pooled_squared


def _live(g_sq: Tensor, g_sq_max: Tensor) -> Tensor:
    """Samples whose output equals their reference have g = 0 and no direction to reconstruct."""
    return g_sq > torch.finfo(g_sq.dtype).eps * g_sq_max


def losses(sq_errors: Tensor, g_sq: Tensor, batch_g_sq: Tensor | None = None) -> Losses:
    """Both losses of a batch, or a chunk's share of them: with batch_g_sq (the whole batch's
    ||g_i||^2) the normalisers are the batch's, so the shares of its chunks sum to its losses."""
    batch_g_sq = g_sq if batch_g_sq is None else batch_g_sq
    pooled = sq_errors.sum() / batch_g_sq.sum().clamp_min(torch.finfo(g_sq.dtype).tiny)
    # Masking with `where` (not boolean indexing) keeps the step free of host synchronisation.
    g_sq_max = batch_g_sq.max()
    live = _live(g_sq, g_sq_max)
    ratio = (sq_errors / torch.where(live, g_sq, 1.0)).clamp_min(1e-12).sqrt()
    n_live = live.sum() if batch_g_sq is g_sq else _live(batch_g_sq, g_sq_max).sum()
    paper = torch.where(live, ratio, 0.0).sum() / n_live.clamp_min(1)
    return Losses(paper=paper, pooled_squared=pooled)


@dataclass
class LossSums:
    """Both losses pooled over many batches (not averaged over batches): evaluation's form."""

    sq_errors: float = 0.0
    g_sq: float = 0.0
    ratios: float = 0.0
    n_live: int = 0

    def add(self, sq_errors: Tensor, g_sq: Tensor, batch_g_sq: Tensor | None = None) -> None:
        """One batch's ||g_i - g^_i||^2 and ||g_i||^2 (liveness judged within the batch, whose
        ||g_i||^2 are `batch_g_sq` when these rows are one rank's shard of it)."""
        live = _live(g_sq, (g_sq if batch_g_sq is None else batch_g_sq).max())
        self.sq_errors += sq_errors.sum().item()
        self.g_sq += g_sq.sum().item()
        self.ratios += (sq_errors[live] / g_sq[live]).sqrt().sum().item()
        self.n_live += int(live.sum())

    def all_reduce(self, group: Group) -> None:
        """Sum every rank's sums into each rank's."""
        local = torch.tensor(
            [self.sq_errors, self.g_sq, self.ratios, self.n_live], dtype=torch.float64
        )
        (summed,) = group.all_reduce_sum([local])
        self.sq_errors, self.g_sq, self.ratios = (float(v) for v in summed[:3])
        self.n_live = int(summed[3])

    @property
    def paper(self) -> float:
        return self.ratios / max(self.n_live, 1)

    @property
    def pooled_squared(self) -> float:
        return self.sq_errors / max(self.g_sq, 1e-30)


def training_bytes(
    shapes: dict[str, tuple[int, ...]],
    n_subnetworks: int,
    ranks: dict[str, int],
    factorization: Factorization,
) -> int:
    """Memory the subnetworks take while training: V_in and V_out (float32), their gradients and
    AdamW's two moment estimates, i.e. four times the pair's factors."""
    one_set = sum(factor_numel(shapes[n], n_subnetworks, ranks[n], factorization) for n in shapes)
    return 4 * (2 * one_set * 4)


def step_bytes(
    batch: BatchMemory,
    shapes: dict[str, tuple[int, ...]],
    n_subnetworks: int,
    ranks: dict[str, int],
    factorization: Factorization,
) -> int:
    """What one training step holds at its peak beyond the training state: the larger of its
    two phases, forming the batch's gradients (`BatchMemory.activations` and the gradients) and
    the losses with their backward (the gradients, what the projections keep, the Gram's working
    set and, on the dense-direction path of `step_losses`, the flattened gradients and both V's
    dense directions with their gradients)."""
    grams = [gram_bytes(shapes[n], n_subnetworks, ranks[n], factorization) for n in shapes]
    gram = sum(kept for kept, _ in grams) + max(transient for _, transient in grams)
    flat = 0
    n_weights = sum(math.prod(s) for s in shapes.values())
    if batch.dense and (
        n_subnetworks * n_weights <= DENSE_DIRECTIONS_MAX or n_subnetworks <= batch.samples
    ):
        flat = 4 * n_weights * (batch.samples + 4 * n_subnetworks)
    return batch.gradients + max(batch.activations, batch.kept + gram + flat)


def device_memory(device: torch.device) -> int:
    """Total memory of a device in bytes: the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n_bytes: float) -> str:
    unit = next((u for u in ("GB", "MB", "kB") if n_bytes >= _UNITS[u]), "B")
    value = n_bytes / _UNITS[unit]
    return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"


_UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1.0}


def describe_memory(
    shapes: dict[str, tuple[int, ...]],
    n_subnetworks: int,
    ranks: dict[str, int],
    factorization: Factorization,
    device: torch.device | str | None = None,
    step: int | None = None,
) -> str:
    """One line for the start of a run: the training state's size, and with `step`
    (`step_bytes`) what a step adds, against the device's memory."""
    device = torch.device("cpu" if device is None else device)
    need = training_bytes(shapes, n_subnetworks, ranks, factorization)
    state = f"training state (V_in, V_out, their gradients, AdamW moments): about {_size(need)}"
    if step is not None:
        state += f"; one step adds about {_size(step)} (activations, gradients, kept products)"
    return f"{state}; the {_size(device_memory(device))} of {device}"


def check_memory(
    shapes: dict[str, tuple[int, ...]],
    n_subnetworks: int,
    ranks: dict[str, int],
    factorization: Factorization,
    device: torch.device | str | None = None,
    step: int = 0,
) -> None:
    """Refuse, before allocating, subnetworks whose training state (plus `step`, what one step
    adds: `step_bytes`) exceeds the device's memory (and, on another device, factors that
    exceed the CPU's, where they are drawn)."""
    device = torch.device("cpu" if device is None else device)
    need = training_bytes(shapes, n_subnetworks, ranks, factorization)
    checks = [(device, need + step)]
    checks += [(torch.device("cpu"), need // 4)] if device.type != "cpu" else []
    for where, n_bytes in checks:
        available = device_memory(where)
        if n_bytes <= available:
            continue
        if need <= available < n_bytes:
            raise L3DError(
                f"one training step needs about {_size(step)} on top of the {_size(need)} of "
                f"subnetwork state, more than the {_size(available)} of memory of {where}: "
                "reduce batch_size, or take the batch in chunks (sequence_chunk_size with "
                "per_token, chunk_size otherwise; same result), or fewer subnetworks"
            )
        raise L3DError(
            f"n_subnetworks={n_subnetworks} of these ranks needs about {_size(need)} for V_in, "
            f"V_out, their gradients and AdamW state, more than the {_size(available)} of "
            f"memory of {where}: reduce n_subnetworks, the ranks or the decomposed tensors "
            "(params)"
        )


class SubnetworkPair(nn.Module):
    """V_in (encode gradients into coefficients) and V_out (decode, unit-norm subnetworks)."""

    def __init__(self, v_in: Subnetworks, v_out: Subnetworks) -> None:
        super().__init__()
        self.v_in, self.v_out = v_in, v_out

    @classmethod
    def initialize(
        cls,
        shapes: dict[str, tuple[int, ...]],
        n_subnetworks: int,
        ranks: dict[str, int],
        factorization: Factorization,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> SubnetworkPair:
        """Random factors (on the CPU); V_out normalised; V_in starts equal to V_out, so the first
        coefficients are the projections <v_k, g_i> (as in the authors' code), then the two train
        separately. First refuses a pair whose training state would not fit in the memory of
        `device` (the CPU when None; see `check_memory`)."""
        check_memory(shapes, n_subnetworks, ranks, factorization, device)
        v_out = Subnetworks(shapes, n_subnetworks, ranks, factorization, generator)
        v_out.normalize_()
        v_in = Subnetworks(shapes, n_subnetworks, ranks, factorization, generator)
        v_in.copy_(v_out)
        return cls(v_in, v_out)

    @classmethod
    def like(cls, other: SubnetworkPair, state: dict[str, Tensor]) -> SubnetworkPair:
        """A pair of `other`'s shapes, ranks and factorisation holding `state` (whole tensors):
        an ordinary module again, from the state of a sharded one."""
        v, first = other.v_out, next(iter(state.values()))
        pair = cls(
            *(
                Subnetworks(v.shapes, v.n_subnetworks, v.ranks, v.factorization, dtype=first.dtype)
                for _ in range(2)
            )
        )
        pair.load_state_dict(state)
        return pair.to(first.device)

    def forward(
        self,
        batch: GradientBatch,
        top_k: float,
        group: Group | None = None,
        gram_precision: GramPrecision = "float32",
    ) -> tuple[Tensor, Tensor, Selection]:
        """`step_losses` (paper, pooled squared, top-k) as the module's call: sharded with FSDP2,
        the call gathers the factors and the losses' backward reduce-scatters their gradients."""
        result, chosen = step_losses(self, batch, top_k, group, gram_precision)
        return result.paper, result.pooled_squared, chosen


# With dense gradients, a step materialises the directions when n_v x n_w is at most this, or
# when V is no larger than the gradients already held (n_v <= n_samples): three matrix products
# then replace many small per-tensor contractions (toys) or their large intermediates (LMs).
DENSE_DIRECTIONS_MAX = 1 << 20


def step_losses(
    pair: SubnetworkPair,
    batch: GradientBatch,
    top_k: float,
    group: Group | None = None,
    gram_precision: GramPrecision = "float32",
) -> tuple[Losses, Selection]:
    """Losses (differentiable in the subnetworks) and top-k for one batch; with a group, this
    rank's share of the losses of the batch whose shard `batch` is. `gram_precision`: that of
    G's products (`Subnetworks.gram`)."""
    v_in, v_out = pair.v_in, pair.v_out
    if (
        isinstance(batch, DenseGradients)
        and list(batch.grads) == v_out.names
        and (
            v_out.n_subnetworks * v_out.n_weights <= DENSE_DIRECTIONS_MAX
            or v_out.n_subnetworks <= batch.n_samples
        )
    ):
        g = batch.flatten()  # (n_s, n_w)
        v_in_flat, v_out_flat = v_in.materialize_flat(), v_out.materialize_flat()  # (n_v, n_w)
        c, d = g @ v_in_flat.T, g @ v_out_flat.T
        gram = flat_gram(v_out_flat, gram_precision)
    else:
        c, d, gram = batch.project(v_in), batch.project(v_out), v_out.gram(gram_precision)
    g_sq = batch.sq_norms()
    chosen = select(c, g_sq, top_k, group)
    sq_errors = reconstruction_sq_errors(c, d, g_sq, gram, chosen.mask)
    return losses(sq_errors, g_sq, chosen.batch_g_sq), chosen


def chunked_step(
    pair: SubnetworkPair,
    batch: ChunkedGradients,
    top_k: float,
    loss_name: str,
    group: Group | None = None,
    gram_precision: GramPrecision = "float32",
) -> tuple[Losses, Selection]:
    """Losses (detached) and top-k of a batch processed in sample chunks, with the gradient of
    loss `loss_name` accumulated into the factors' .grad (with a group: this rank's shares).

    The batch top-k and the loss normalisers need every sample's c_ik and ||g_i||^2, so pass 1
    computes them chunk by chunk without graph; pass 2 recomputes each chunk with graph and runs
    its share of the backward. G is computed once: its gradient is summed over the chunks and
    sent through the factors at the end. Memory: one chunk's signals and graph; time: about one
    more forward + backward of the model and projection with V_in than the unchunked step.
    """
    v_in, v_out = pair.v_in, pair.v_out
    c_parts, g_sq_parts = [], []
    with torch.no_grad():
        for part in batch.parts:
            chunk = part()
            c_parts.append(chunk.project(v_in))
            g_sq_parts.append(chunk.sq_norms())
            del chunk  # before the next chunk is computed: one chunk's signals at a time
    local_g_sq = torch.cat(g_sq_parts)
    chosen = select(torch.cat(c_parts), local_g_sq, top_k, group)
    gram = v_out.gram(gram_precision)
    gram_leaf = gram.detach().requires_grad_()
    total: Losses | None = None
    start = 0
    for part in batch.parts:
        chunk = part()
        rows = slice(start, start + chunk.n_samples)
        start += chunk.n_samples
        c, d, g_sq = chunk.project(v_in), chunk.project(v_out), local_g_sq[rows]
        del chunk
        share = losses(
            reconstruction_sq_errors(c, d, g_sq, gram_leaf, chosen.mask[rows]),
            g_sq,
            chosen.batch_g_sq,
        )
        share.get(loss_name).backward()
        total = share.detach() if total is None else total + share.detach()
    gram.backward(gram_leaf.grad)
    assert total is not None
    return total, chosen


@dataclass(frozen=True)
class Evaluation:
    p_active: Tensor
    """(n_v,) fraction of samples in which each subnetwork is in the batch top-k (Section 3.3.2)."""
    loss_paper: float
    """mean over samples of ||g_i - g^_i|| / ||g_i||."""
    loss_pooled_squared: float
    """sum over all samples of ||g_i - g^_i||^2 / sum of ||g_i||^2 (the paper's reported number)."""
    n_samples: int


@torch.no_grad()
def evaluate(
    pair: SubnetworkPair,
    source: GradientSource,
    top_k: float,
    seed: int,
    group: Group | None = None,
) -> Evaluation:
    """One pass over the data with fresh references and the training batch size: P_act and both
    losses pooled over the whole pass (not averaged over batches). With a group, each rank takes
    its shard of every batch and all ranks return the whole pass's result."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(pair.v_in.n_subnetworks)
    gram = pair.v_out.gram()
    sums = LossSums()
    n = 0
    for batch in source.epoch(generator, shuffle=True, group=group):
        c, d, g_sq = batch.project(pair.v_in), batch.project(pair.v_out), batch.sq_norms()
        chosen = select(c, g_sq, top_k, group)
        sums.add(reconstruction_sq_errors(c, d, g_sq, gram, chosen.mask), g_sq, chosen.batch_g_sq)
        counts += chosen.active.cpu()
        n += chosen.n_samples
    if group is not None:
        sums.all_reduce(group)
    return Evaluation(
        p_active=counts / max(n, 1),
        loss_paper=sums.paper,
        loss_pooled_squared=sums.pooled_squared,
        n_samples=n,
    )
