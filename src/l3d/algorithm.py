"""Algorithm 1 of the paper: learn V_in, V_out so that a batch top-k of c = V_in g reconstructs g.

One training step (Section 2.4):
  c = V_in g                         coefficients, (n_s, n_v)
  mask = batch_top_k(|c|, k)         exactly round(k * n_s * n_v) entries over the whole batch
  g^ = V_out (c * mask)              never formed: its error comes from the Gram identity
  ||g - g^||^2 = ||g||^2 - 2 sum_k c_k d_k + c^T G c,   d = V_out g, G = V_out V_out^T
  loss = mean_i ||g_i - g^_i|| / ||g_i||  (paper, eq. 8)  or  sum ||g - g^||^2 / sum ||g||^2 (code)
  AdamW step on V_in, V_out; then V_out rows projected to unit L2 norm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from l3d.config import L3DConfig
from l3d.gradients import ChunkedGradients, DenseGradients, GradientBatch, GradientSource
from l3d.subnetworks import Subnetworks


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


def reconstruction_sq_errors(
    c: Tensor, d: Tensor, g_sq: Tensor, gram: Tensor, mask: Tensor
) -> Tensor:
    """||g_i - sum_{k in top-k(i)} c_ik V_out_k||^2 per sample, (n_s,), via design/math.md section 4."""
    c_kept = c * mask
    cross = (c_kept * d).sum(1)
    quad = ((c_kept @ gram) * c_kept).sum(1)  # c^T G c per sample
    return (g_sq - 2 * cross + quad).clamp_min(0)


@dataclass(frozen=True)
class Losses:
    paper: Tensor
    """mean over samples of ||g_i - g^_i|| / ||g_i|| (eq. 8 per sample); zero-gradient samples skipped."""
    pooled_squared: Tensor
    """sum_i ||g_i - g^_i||^2 / sum_i ||g_i||^2: the authors' code, behind every published number."""


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
        factorization: str,
        generator: torch.Generator,
    ) -> SubnetworkPair:
        """Random factors; V_out normalised; V_in starts equal to V_out, so the first coefficients
        are the projections <v_k, g_i> (as in the authors' code), then the two train separately."""
        v_out = Subnetworks(shapes, n_subnetworks, ranks, factorization, generator)
        v_out.normalize_()
        v_in = Subnetworks(shapes, n_subnetworks, ranks, factorization, generator)
        v_in.copy_(v_out)
        return cls(v_in, v_out)


@contextmanager
def single_thread_if(enabled: bool) -> Iterator[None]:
    """Run the block with one intra-op CPU thread, restoring the caller's setting after."""
    if not enabled:
        yield
        return
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Run the block at torch's float32 matmul `precision`, restoring the caller's after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass(frozen=True)
class StepResult:
    losses: Losses
    active: Tensor
    """(n_v,) number of samples in which each subnetwork was in the top-k."""
    n_samples: int


# With dense gradients, a step materialises the directions when n_v x n_w is at most this, or
# when V is no larger than the gradients already held (n_v <= n_samples): three matrix products
# then replace many small per-tensor contractions (toys) or their large intermediates (LMs).
DENSE_DIRECTIONS_MAX = 1 << 20


def step_losses(pair: SubnetworkPair, batch: GradientBatch, top_k: float) -> tuple[Losses, Tensor]:
    """Losses and top-k mask for one batch (differentiable in the subnetworks)."""
    v_in, v_out = pair.v_in, pair.v_out
    dense = (
        isinstance(batch, DenseGradients)
        and list(batch.grads) == v_out.names
        and (
            v_out.n_subnetworks * v_out.n_weights <= DENSE_DIRECTIONS_MAX
            or v_out.n_subnetworks <= batch.n_samples
        )
    )
    if dense:
        g = batch.flatten()  # (n_s, n_w)
        v_in_flat, v_out_flat = v_in.materialize_flat(), v_out.materialize_flat()  # (n_v, n_w)
        c, d, gram = g @ v_in_flat.T, g @ v_out_flat.T, v_out_flat @ v_out_flat.T
    else:
        c, d, gram = batch.project(v_in), batch.project(v_out), v_out.gram()
    mask = batch_top_k(c, top_k)
    g_sq = batch.sq_norms()
    return losses(reconstruction_sq_errors(c, d, g_sq, gram, mask), g_sq), mask


def chunked_step(
    pair: SubnetworkPair, batch: ChunkedGradients, top_k: float, loss_name: str
) -> tuple[Losses, Tensor]:
    """Losses (detached) and top-k mask of a batch processed in sample chunks, with the gradient
    of loss `loss_name` accumulated into the factors' .grad.

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
    c_all, g_sq_all = torch.cat(c_parts), torch.cat(g_sq_parts)
    mask_all = batch_top_k(c_all, top_k)
    gram = v_out.gram()
    gram_leaf = gram.detach().requires_grad_()
    totals = {"paper": 0.0, "pooled_squared": 0.0}
    start = 0
    for part in batch.parts:
        chunk = part()
        rows = slice(start, start + chunk.n_samples)
        start += chunk.n_samples
        c, d, g_sq = chunk.project(v_in), chunk.project(v_out), g_sq_all[rows]
        del chunk
        share = losses(
            reconstruction_sq_errors(c, d, g_sq, gram_leaf, mask_all[rows]), g_sq, g_sq_all
        )
        getattr(share, loss_name).backward()
        for name in totals:
            totals[name] = totals[name] + getattr(share, name).detach()
    gram.backward(gram_leaf.grad)
    return Losses(**totals), mask_all


class Trainer:
    """Runs Algorithm 1. State (subnetworks, optimiser, schedule, RNG, epoch) is all in
    `state_dict()`, so a run can be checkpointed and resumed to the same result."""

    def __init__(self, config: L3DConfig, source: GradientSource, pair: SubnetworkPair) -> None:
        self.config, self.source, self.pair = config, source, pair
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        wd = config.weight_decay if config.optimizer == "adamw" else 0.0
        # The fused kernel updates every factor in one call: on toy problems the per-tensor
        # optimiser loop otherwise costs about as much as the rest of the step.
        self.optimizer = opt_cls(pair.parameters(), lr=config.lr, weight_decay=wd, fused=True)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []

    def lr_at(self, step: int, epoch: int) -> float:
        c = self.config
        n = (step if c.lr_decay_unit == "step" else epoch) // c.lr_decay_every
        return c.lr * c.lr_decay**n

    def top_k_at(self, epoch: int) -> float:
        c = self.config
        return c.warm_start_top_k if epoch < c.warm_start_epochs else c.top_k

    def train_step(self, batch: GradientBatch) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        with matmul_precision(self.config.matmul_precision):
            if isinstance(batch, ChunkedGradients):
                result, mask = chunked_step(
                    self.pair, batch, self.top_k_at(self.epoch), self.config.loss
                )
            else:
                result, mask = step_losses(self.pair, batch, self.top_k_at(self.epoch))
                getattr(result, self.config.loss).backward()
        self.optimizer.step()
        self.pair.v_out.normalize_()
        self.step += 1
        return StepResult(
            losses=Losses(result.paper.detach(), result.pooled_squared.detach()),
            active=mask.sum(0).cpu(),
            n_samples=batch.n_samples,
        )

    def _tiny(self) -> bool:
        """Small enough that every op is a few microseconds: extra CPU threads only add
        synchronisation, and on a shared machine they stall the step by orders of magnitude."""
        v = self.pair.v_out
        return self.config.device == "cpu" and v.n_subnetworks * v.n_weights <= DENSE_DIRECTIONS_MAX

    def run_epoch(self, on_step: Callable[[StepResult], None] | None = None) -> dict:
        start = time.perf_counter()
        totals = {"paper": 0.0, "pooled_squared": 0.0}
        active = torch.zeros(self.config.n_subnetworks)
        n_batches = n_samples = 0
        lr = self.lr_at(self.step, self.epoch)
        # The precision also covers the model's forward and backward that produce the gradients.
        with single_thread_if(self._tiny()), matmul_precision(self.config.matmul_precision):
            for batch in self.source.epoch(self.generator):
                r = self.train_step(batch)
                totals["paper"] += r.losses.paper.item()
                totals["pooled_squared"] += r.losses.pooled_squared.item()
                active += r.active
                n_batches += 1
                n_samples += r.n_samples
                if on_step is not None:
                    on_step(r)
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "loss_paper": totals["paper"] / max(n_batches, 1),
            "loss_pooled_squared": totals["pooled_squared"] / max(n_batches, 1),
            "lr": lr,
            "top_k": self.top_k_at(self.epoch),
            "live_subnetworks": int((active > 0).sum()),
            "seconds": time.perf_counter() - start,
        }
        self.history.append(record)
        self.epoch += 1
        return record

    def state_dict(self) -> dict:
        return {
            "pair": self.pair.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.pair.load_state_dict(state["pair"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])


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
def evaluate(pair: SubnetworkPair, source: GradientSource, top_k: float, seed: int) -> Evaluation:
    """One pass over the data with fresh references and the training batch size: P_act and both
    losses pooled over the whole pass (not averaged over batches)."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(pair.v_in.n_subnetworks)
    gram = pair.v_out.gram()
    sq_err = g_sq_total = ratio_sum = 0.0
    n = n_live = 0
    for batch in source.epoch(generator, shuffle=True):
        c, d, g_sq = batch.project(pair.v_in), batch.project(pair.v_out), batch.sq_norms()
        mask = batch_top_k(c, top_k)
        e = reconstruction_sq_errors(c, d, g_sq, gram, mask)
        counts += mask.sum(0).cpu()
        n += batch.n_samples
        sq_err += e.sum().item()
        g_sq_total += g_sq.sum().item()
        live = g_sq > torch.finfo(g_sq.dtype).eps * g_sq.max()
        ratio_sum += (e[live] / g_sq[live]).sqrt().sum().item()
        n_live += int(live.sum())
    return Evaluation(
        p_active=counts / max(n, 1),
        loss_paper=ratio_sum / max(n_live, 1),
        loss_pooled_squared=sq_err / max(g_sq_total, 1e-30),
        n_samples=n,
    )
