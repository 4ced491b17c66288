"""Re-initialise dead and duplicate subnetworks during training (fixes Section 3.3.2's failures),
and initialise subnetworks from the gradients' own structure (`L3DConfig.init`).

With as many subnetworks as circuits, Algorithm 1 often ends with one subnetwork dead (never in the
top-k) or two subnetworks sharing one circuit while another circuit has none. Sparse-autoencoder
practice answers the same failure by resampling: every few epochs, point each dead or duplicate
subnetwork at the gradient residual g_i - g^_i of a sample that the others reconstruct worst, as a
rank-limited direction, and reset its optimiser state. An option of the trainer
(L3DConfig.resample_every), between epochs, so Algorithm 1's steps are unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair, batch_top_k, evaluate
from l3d.core.distributed import full, set_full_
from l3d.core.gradients import GradientSource, all_zero
from l3d.core.gradients.jacobian import PROGRESS_DELAY_SECONDS
from l3d.core.subnetworks import Subnetworks, total
from l3d.errors import L3DError


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


# Dense per-sample gradients the gradient initialisation holds at once (float32: 256 MiB).
INIT_MAX_ELEMENTS = 1 << 26
INIT_LLOYD_STEPS = 10
INIT_SWAP_PATIENCE = 10
INIT_SWAP_LLOYD_STEPS = 3
"""Lloyd steps after each proposed swap, before its objective is compared (all of them once the
search ends)."""
DENSE_AUTO_SAMPLES = 4
"""Library defaults use the dense helpers only where INIT_MAX_ELEMENTS holds this many gradients
per subnetwork (`dense_helpers_fit`)."""


def dense_helpers_fit(n_weights: int, n_subnetworks: int, batch_size: int, per_token: bool) -> bool:
    """Whether the helpers that form dense per-sample gradients and directions (the gradient
    initialisation, resampling) stay small enough to be turned on by default: INIT_MAX_ELEMENTS
    holds DENSE_AUTO_SAMPLES gradients per subnetwork and one batch of gradients, and samples are
    not per token (a batch of those is sequences x positions dense gradients, unbounded here)."""
    per_subnetwork = INIT_MAX_ELEMENTS // max(n_weights, 1) >= DENSE_AUTO_SAMPLES * n_subnetworks
    return per_subnetwork and batch_size * n_weights <= INIT_MAX_ELEMENTS and not per_token


@contextmanager
def _bar(enabled: bool, desc: str, total: int, unit: str) -> Iterator:
    """A progress bar for a stage of the initialisation, shown once it has taken a few seconds."""
    from tqdm.auto import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit=unit,
        delay=PROGRESS_DELAY_SECONDS,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        yield bar


@torch.no_grad()
def initialize_from_gradients_(
    pair: SubnetworkPair,
    source: GradientSource,
    seed: int,
    n_samples: int | None = None,
    swap_search: bool = False,
) -> int:
    """Set V_out (and V_in, equal to it as at initialisation) to the centres of a sign-free
    spherical k-means of per-sample gradients g_i at W0 (`spherical_kmeans`), each centre fitted
    at the subnetworks' rank (`set_direction_`). A gradient made by one circuit points along it,
    so with sparse circuits many samples' gradients already are subnetworks, where random factors
    start far from all of them. n_samples: how many samples to draw (`L3DConfig.init_samples`;
    None: as many as INIT_MAX_ELEMENTS entries hold, at least n_v); swap_search: improve the
    k-means by swaps (`L3DConfig.init_swap_search`). Returns the number of sampled gradients that
    are not zero."""
    v_out = pair.v_out
    n_v, names = v_out.n_subnetworks, v_out.names
    generator = torch.Generator().manual_seed(seed)
    if n_samples is None:
        n_samples = max(INIT_MAX_ELEMENTS // v_out.n_weights, n_v)
    # Both stages can take tens of seconds (ResidMLP: 2,700 gradients of 100,000 weights).
    known = None if source.dataset is None else source.dataset.n_samples
    total = n_samples if known is None or source.per_token else min(n_samples, known)
    with _bar(source.progress, "init: per-sample gradients", total, "gradient") as bar:
        g = sampled_gradients(source, names, n_samples, generator, bar.update)
    if not len(g):
        raise all_zero("the gradient initialisation (init='gradients') found")
    if len(g) < n_v:
        raise L3DError(
            f"init='gradients' needs at least n_subnetworks={n_v} samples with a nonzero "
            f"gradient; found {len(g)}: use init='random' or more data"
        )
    stages = 3 if swap_search else 2
    with _bar(source.progress, f"init: k-means of {len(g)} gradients", stages, "stage") as bar:
        started: list[str] = []

        def stage(name: str) -> None:
            bar.update(len(started) > 0)  # the stage before is done
            started.append(name)
            bar.set_postfix_str(name)

        centres = spherical_kmeans(g, n_v, generator, swap_search, stage)
        bar.update(1)
    offsets = [0, *itertools.accumulate(math.prod(f.work_shape) for f in v_out.factors)]
    for k in range(n_v):
        direction = {n: centres[k, a:b].to(v_out.factors[0].modes[0].device)
                     for n, a, b in zip(names, offsets, offsets[1:])}  # fmt: skip
        set_direction_(v_out, k, direction)
    v_out.normalize_()
    pair.v_in.copy_(v_out)
    return len(g)


def spherical_kmeans(
    g: Tensor,
    n: int,
    generator: torch.Generator,
    swap_search: bool = False,
    stage: Callable[[str], None] | None = None,
) -> Tensor:
    """Centres (n, d), unit rows, of a sign-free spherical k-means of the unit rows of g (M, d),
    which maximises sum_i max_k cos^2(g_i, centre_k): k-means++ seeding on 1 - cos^2, Lloyd steps
    (each g_i to the centre of largest |cos|; a centre is the sign-aligned mean of its rows), then
    with swap_search the local search for k-means of Kanungo et al. (2004): move the centre whose
    removal costs the objective least onto the row where a new centre would add the most (the
    rows it would fit better than their own centres do, e.g. a circuit without one), run Lloyd,
    keep the swap if the objective rose; stop after INIT_SWAP_PATIENCE proposals in a row that did
    not, or after n proposals. Lloyd steps alone keep a circuit with few samples without a centre
    when the seeding put two centres on another one or one on a mixture of circuits (ResidMLP:
    one or two of 100 features, each worth 20-150 one-hot-probe errors; docs/toys.md). A higher
    objective is not always a better start: on X² the search cost one seed an input, so it is
    an option.

    Works on coordinates y (M, r) with y y^T = g g^T, r <= min(M, d), so that a step costs
    M r n multiply-adds rather than M d n; centres are kept as signed sums of rows
    (`members`, (n, M)) and formed in the d-dimensional space once, at the end. `stage` is told
    each stage's name as it starts (for a progress bar)."""
    stage = stage or (lambda name: None)
    stage("eigen-coordinates")
    y = _coordinates(g)
    stage("Lloyd steps")
    members = _lloyd(y, _one_hot_rows(_kmeans_plus_plus(y, n, generator), len(y)))
    if swap_search:
        stage("swap search")
        members = _swap_search(y, members)
    centres = members.to_sparse() @ g
    return centres / centres.norm(dim=1, keepdim=True)


def _swap_search(y: Tensor, members: Tensor) -> Tensor:
    """`spherical_kmeans`'s swaps from Lloyd's fixed point `members` (n, M)."""
    n, m = members.shape
    objective = _kmeans_objective(y, members)
    cos2 = (y @ y.T).pow(2)  # (M, M) between rows
    tried = torch.zeros(m, dtype=torch.bool)
    misses = proposals = 0
    while n > 1 and misses < INIT_SWAP_PATIENCE and proposals < n:
        best = (y @ _centres(y, members).T).pow(2).topk(2, dim=1)  # (M, 2) of cos^2
        # What a centre at row i would add: the rows it would fit better than their centres do.
        gain = (cos2 - best.values[None, :, 0]).clamp_min(0).sum(1).masked_fill(tried, -1.0)
        i = int(gain.argmax())
        tried[i] = True
        # Removing centre k moves its rows to their second-best centre.
        loss = best.values[:, 0] - best.values[:, 1]
        cost = torch.zeros(n).index_add_(0, best.indices[:, 0], loss)
        trial = members.clone()
        trial[int(cost.argmin())] = _one_hot_rows([i], m)[0]
        trial = _lloyd(y, trial, INIT_SWAP_LLOYD_STEPS)
        value = _kmeans_objective(y, trial)
        proposals += 1
        if value > objective:
            members, objective, misses = trial, value, 0
        else:
            misses += 1
    return _lloyd(y, members)


def _coordinates(g: Tensor) -> Tensor:
    """y (M, r) with y y^T = g g^T: g itself when it has no more columns than rows, else the
    eigen-coordinates of its rows' Gram matrix (eigenvalues below float32 round-off dropped),
    formed from bfloat16 rows."""
    if g.shape[1] <= g.shape[0]:
        return g
    # bfloat16 operands, float32 sums: about 3x faster here, and errors of about 1e-3 in the cos
    # values move no sample between clusters that are told apart by their circuits.
    low = g.bfloat16()
    values, vectors = torch.linalg.eigh((low @ low.T).double())
    keep = values > values.max() * 1e-7
    return (vectors[:, keep] * values[keep].sqrt()).to(g.dtype)


def _one_hot_rows(rows: list[int], m: int) -> Tensor:
    """(len(rows), m): centre j is row rows[j] of the samples."""
    members = torch.zeros(len(rows), m)
    members[torch.arange(len(rows)), torch.tensor(rows)] = 1.0
    return members


def _centres(y: Tensor, members: Tensor) -> Tensor:
    centres = members @ y
    return centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _lloyd(y: Tensor, members: Tensor, steps: int = INIT_LLOYD_STEPS) -> Tensor:
    """Up to `steps` Lloyd steps from `members`, fewer if the assignment settles; a centre that
    loses all its rows keeps its previous ones."""
    rows = torch.arange(len(y))
    for _ in range(steps):
        cos = y @ _centres(y, members).T  # (M, n)
        owner = cos.abs().argmax(1)
        new = torch.zeros_like(members)
        new[owner, rows] = cos[rows, owner].sign()
        empty = (new @ y).norm(dim=1) == 0
        new[empty] = members[empty]
        if torch.equal(new, members):
            break
        members = new
    return members


def _kmeans_objective(y: Tensor, members: Tensor) -> float:
    return float((y @ _centres(y, members).T).pow(2).amax(1).sum())


def sampled_gradients(
    source: GradientSource,
    names: list[str],
    n: int,
    generator: torch.Generator,
    done: Callable[[int], object] | None = None,
) -> Tensor:
    """Up to n per-sample gradients of a pass over the data (shuffled and referenced with
    `generator`), flattened over `names` and normalised, (M, n_weights); zero ones left out.
    `done` is told how many rows each batch added (for a progress bar)."""
    rows: list[Tensor] = []
    for batch in source.epoch(generator):
        dense = batch.dense()
        rows.append(torch.cat([dense[name].flatten(1) for name in names], 1).float().cpu())
        if done is not None:
            done(min(len(rows[-1]), n - sum(len(r) for r in rows[:-1])))
        if sum(len(r) for r in rows) >= n:
            break
    g = torch.cat(rows)[:n]
    norms = g.norm(dim=1)
    return g[norms > 0] / norms[norms > 0, None]


# Choosing n_subnetworks: at least this many sampled gradients, and this many subnetworks per
# effective direction of the gradients (twice as many subnetworks as circuits recovered every unit
# of the toys where as many did not: docs/toys.md).
COUNT_MIN_SAMPLES = 64
SUBNETWORKS_PER_DIRECTION = 2


@torch.no_grad()
def effective_directions(
    source: GradientSource, names: list[str], n_weights: int, seed: int
) -> float:
    """The participation ratio (Σσ²)² / Σσ⁴ of the singular values σ of the normalised per-sample
    gradients (up to INIT_MAX_ELEMENTS entries): how many directions the gradients spread over.
    k orthogonal directions used equally give k. Measured on the suite's toys it is close to the
    number of ground-truth circuits (TMS 5-2: 6.6 for 5; TMS 40-10: 59 for 40; TMCS: 9.5 for 10;
    higher-rank: 5.1 for 5 groups; X²: 6.2 for 5; ResidMLP: 163 for 100 features of two signs)."""
    n = INIT_MAX_ELEMENTS // n_weights
    if n < COUNT_MIN_SAMPLES:
        raise L3DError(
            f"choosing n_subnetworks samples dense per-sample gradients, and {n_weights} weights "
            f"leave room for only {n} of them (at least {COUNT_MIN_SAMPLES}): give n_subnetworks"
        )
    g = sampled_gradients(source, names, n, torch.Generator().manual_seed(seed))
    if not len(g):
        raise all_zero("choosing n_subnetworks from the data's gradients found")
    if len(g) < 2:
        raise L3DError(
            "choosing n_subnetworks needs per-sample gradients, and the data give fewer than 2 "
            "nonzero ones: give n_subnetworks"
        )
    gram = (g @ g.T).double()  # its eigenvalues are σ²
    return float(gram.trace() ** 2 / gram.pow(2).sum())


def _kmeans_plus_plus(g: Tensor, n: int, generator: torch.Generator) -> list[int]:
    """Indices of n rows of g (M, r), each next one drawn with probability proportional to its
    1 - cos^2 to the nearest already drawn (sign-free k-means++ seeding; rows of unit norm, or
    coordinates of such rows)."""
    first = int(torch.randint(len(g), (1,), generator=generator))
    chosen = [first]
    distance = 1 - (g @ g[first]).pow(2)
    for _ in range(n - 1):
        weights = distance.clamp_min(0)
        i = (
            int(torch.multinomial(weights, 1, generator=generator))
            if weights.sum() > 0
            else int(torch.randint(len(g), (1,), generator=generator))
        )
        chosen.append(i)
        distance = torch.minimum(distance, 1 - (g @ g[i]).pow(2))
    return chosen
