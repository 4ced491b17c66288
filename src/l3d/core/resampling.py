"""Re-initialise dead and duplicate subnetworks during training (fixes Section 3.3.2's failures).

With as many subnetworks as circuits, Algorithm 1 often ends with one subnetwork dead (never in the
top-k) or two subnetworks sharing one circuit while another circuit has none. Sparse-autoencoder
practice answers the same failure by resampling: every few epochs, point each dead or duplicate
subnetwork at the gradient residual g_i - g^_i of a sample that the others reconstruct worst, as a
rank-limited direction, and reset its optimiser state. An option of the trainer
(L3DConfig.resample_every), between epochs, so Algorithm 1's steps are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair, batch_top_k, evaluate
from l3d.core.distributed import full, set_full_
from l3d.core.gradients import GradientSource
from l3d.core.subnetworks import Subnetworks, total


@dataclass
class Resampler:
    """After every `every` epochs while epoch < `until`, re-initialise subnetworks that were never
    in the top-k (P_act <= min_p_active) or whose V_out has |cosine| > `duplicate_cos` with a more
    active one. An option of the trainer (L3DConfig.resample_every), so every run path has it."""

    every: int
    until: int
    duplicate_cos: float = 0.9
    min_p_active: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, config: L3DConfig) -> Resampler | None:
        if config.resample_every is None:
            return None
        until = config.epochs if config.resample_until is None else config.resample_until
        return cls(
            config.resample_every,
            until,
            config.resample_duplicate_cos,
            config.resample_min_p_active,
            seed=config.seed,
        )

    def __call__(
        self,
        pair: SubnetworkPair,
        source: GradientSource,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        top_k: float,
    ) -> list[int]:
        """Resample after `epoch` epochs if one is due; the resampled subnetworks' indices."""
        if epoch % self.every or epoch >= self.until:
            return []
        p_act = evaluate(pair, source, top_k, self.seed + epoch).p_active
        chosen = stale_subnetworks(pair.v_out, p_act, self.duplicate_cos, self.min_p_active)
        if not chosen:
            return []
        directions = residual_directions(pair, source, top_k, len(chosen), self.seed + epoch)
        chosen = chosen[: len(directions)]
        for k, direction in zip(chosen, directions):
            set_direction_(pair.v_out, k, direction)
        pair.v_out.normalize_()
        copy_rows_(pair.v_in, pair.v_out, chosen)  # as at initialisation
        reset_optimizer_rows_(optimizer, chosen)
        return chosen


@torch.no_grad()
def stale_subnetworks(
    v_out: Subnetworks, p_active: Tensor, duplicate_cos: float, min_p_active: float = 0.0
) -> list[int]:
    """Dead subnetworks (P_act <= min_p_active) and, of each near-duplicate pair (|cos| of V_out
    above duplicate_cos), the less active one."""
    stale = {int(k) for k in torch.nonzero(p_active <= min_p_active).flatten()}
    gram = v_out.gram()
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    cos = (gram / norms[:, None] / norms[None, :]).abs()
    cos.fill_diagonal_(0)
    for k, l in torch.nonzero(torch.triu(cos > duplicate_cos)).tolist():
        if k not in stale and l not in stale:
            stale.add(k if p_active[k] < p_active[l] else l)
    return sorted(stale)


@torch.no_grad()
def residual_directions(
    pair: SubnetworkPair, source: GradientSource, top_k: float, n: int, seed: int
) -> list[dict[str, Tensor]]:
    """Up to n gradient residuals g_i - g^_i {name: tensor}, of the worst-reconstructed samples
    (at most one per batch, mutually |cos| < 0.9). Every backend's batch gives its dense
    gradients for this (the structured one forms them from its signals, one batch at a time)."""
    generator = torch.Generator().manual_seed(seed)
    dense_out = pair.v_out.materialize()  # {name: (n_v, *shape)}
    candidates: list[tuple[float, dict[str, Tensor]]] = []
    for batch in source.epoch(generator):
        grads = batch.dense()
        c = batch.project(pair.v_in)
        kept = c * batch_top_k(c, top_k)  # (n_s, n_v)
        residual = {
            name: g - torch.einsum("sk,k...->s...", kept, dense_out[name])
            for name, g in grads.items()
        }
        errors = total(r.flatten(1).pow(2).sum(1) for r in residual.values())
        i = int(errors.argmax())
        candidates.append((float(errors[i]), {name: r[i] for name, r in residual.items()}))
    candidates.sort(key=lambda item: -item[0])
    picked: list[dict[str, Tensor]] = []
    for _, direction in candidates:
        flat = _flat(direction)
        if all(abs(float(flat @ _flat(p))) < 0.9 * flat.norm() * _flat(p).norm() for p in picked):
            picked.append(direction)
        if len(picked) == n:
            break
    return picked


def _flat(direction: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in direction.values()])


@torch.no_grad()
def set_direction_(subnetworks: Subnetworks, k: int, direction: dict[str, Tensor]) -> None:
    """Set subnetwork k's factors to the best low-rank fit of `direction` per tensor: a truncated
    SVD for matrices, the vector itself for 1-d tensors, a random direction otherwise (CP only)."""
    for name, factors in zip(subnetworks.names, subnetworks.factors):
        target = direction[name].reshape(factors.work_shape)
        if factors.core is not None or target.dim() > 2:
            continue
        if target.dim() == 1:
            factors.modes[0][k].zero_()
            factors.modes[0][k, 0] = target
            continue
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        r = factors.rank
        root = s[:r].sqrt()
        factors.modes[0][k].zero_()
        factors.modes[1][k].zero_()
        factors.modes[0][k, : len(root)] = (u[:, :r] * root).T
        factors.modes[1][k, : len(root)] = vh[:r] * root[:, None]


@torch.no_grad()
def copy_rows_(dst: Subnetworks, src: Subnetworks, rows: list[int]) -> None:
    for mine, theirs in zip(dst.parameters(), src.parameters()):
        mine[rows] = theirs[rows]


def reset_optimizer_rows_(optimizer: torch.optim.Optimizer, rows: list[int]) -> None:
    """Forget Adam's first moment for the resampled subnetworks (dim 0 of every factor) and give
    them the mean second moment of the others, so their first steps are of ordinary size."""
    index = torch.tensor(rows)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            # Sharded factors' moments are edited whole (rows of any rank; the mean over all).
            exp_avg, exp_avg_sq = full(state["exp_avg"]), full(state["exp_avg_sq"])
            exp_avg[index] = 0
            others = torch.ones(p.shape[0], dtype=torch.bool)
            others[index] = False
            if others.any():
                exp_avg_sq[index] = exp_avg_sq[others].mean(0)
            set_full_(state["exp_avg"], exp_avg)
            set_full_(state["exp_avg_sq"], exp_avg_sq)
