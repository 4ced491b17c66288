"""Ground-truth metrics for toy-model decompositions, all computed on held-out samples.

A toy's ground truth is a set of *units* (a TMS feature, a TMCS input, a higher-rank group, an X^2
input), each a set of input features that are active together. Every metric here answers one
question about how the learned subnetworks relate to those units; none does I/O.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from l3d.core.algorithm import batch_top_k
from l3d.core.model import Target
from l3d.core.subnetworks import total
from l3d.decomposition import Decomposition
from l3d.errors import L3DError

DELTAS = (0.25, 0.5, 1.0, 2.0)
"""Intervention sizes |delta| (subnetworks are unit vectors in parameter space)."""


# Losses -------------------------------------------------------------------------------------


def heldout_losses(decomposition: Decomposition, inputs: Tensor, seed: int) -> dict:
    """Both loss forms and P_act on held-out inputs (fresh random references, training batch
    size)."""
    ev = decomposition.evaluate(inputs, seed=seed)
    return {
        "loss_pooled_squared": ev.loss_pooled_squared,
        "loss_paper": ev.loss_paper,
        "p_active": ev.p_active.tolist(),
        "dead_subnetworks": [int(k) for k in torch.nonzero(ev.p_active == 0).flatten()],
        "n_samples": ev.n_samples,
    }


@torch.no_grad()
def dense_directions(decomposition: Decomposition) -> dict[str, Tensor]:
    """V_out as {param: (n_v, *shape)} (small models only: n_v x n_w memory)."""
    return decomposition.subnetworks.v_out.materialize()


# Which subnetwork belongs to which unit --------------------------------------------------------


def single_unit_samples(inputs: Tensor, units: Tensor) -> Tensor:
    """(n_samples,) index of the only active unit of each sample, -1 where 0 or >= 2 are active.

    units: (n_units, n_features) bool."""
    active = (inputs.abs() > 0).float() @ units.float().T > 0  # (n_samples, n_units)
    only = active.sum(1) == 1
    return torch.where(only, active.float().argmax(1), torch.full_like(only, -1, dtype=torch.long))


@torch.no_grad()
def unit_impacts(
    decomposition: Decomposition, inputs: Tensor, units: Tensor, n_references: int = 10
) -> Tensor:
    """(n_units, n_v): mean impact I(x, v_k) (eq. 10-11, random held-out references) over the
    held-out samples in which unit j is the only active unit."""
    impact = decomposition.impact(inputs, n_references=n_references)  # (n_samples, n_v)
    owner = single_unit_samples(inputs, units)
    rows = []
    for j in range(units.shape[0]):
        mine = owner == j
        rows.append(impact[mine].mean(0) if mine.any() else impact.new_zeros(impact.shape[1]))
    return torch.stack(rows)


def match_units(score: Tensor) -> list[int]:
    """One-to-one assignment of units to subnetworks maximising the total score (Hungarian).

    score: (n_units, n_v) with n_v >= n_units; returns the subnetwork index of each unit."""
    rows, cols = linear_sum_assignment(score.detach().cpu().numpy(), maximize=True)
    assignment = [-1] * score.shape[0]
    for r, c in zip(rows, cols):
        assignment[int(r)] = int(c)
    return assignment


def impact_share(impacts: Tensor) -> Tensor:
    """(n_units, n_v): the share of each subnetwork's impact that falls on each unit (columns sum
    to 1; a dead subnetwork's column is 0)."""
    return impacts / impacts.sum(0, keepdim=True).clamp_min(1e-30)


def matching_score(impacts: Tensor) -> Tensor:
    """(n_units, n_v): share x coverage, what units are matched to subnetworks on. The share alone
    is 1 for a near-empty twin whose tiny impact happens to fall on one unit; the coverage (the
    part of unit j's impact that subnetwork k carries) makes the matching pick the subnetwork that
    both is pure and does the unit's work."""
    coverage = impacts / impacts.sum(1, keepdim=True).clamp_min(1e-30)
    return impact_share(impacts) * coverage


SHARE_THRESHOLDS = (0.5, 0.8, 0.9)
"""Matched shares reported besides the headline count: > 0.5 is lenient (two subnetworks can
split a unit 0.6 / 0.4 and still count), 0.8 and 0.9 ask for purity."""


def recovery(share: Tensor, threshold: float = 0.5, score: Tensor | None = None) -> dict:
    """Each unit gets its own subnetwork when the subnetwork matched to it (Hungarian on `score`,
    default `share`) puts more than `threshold` of its impact on that unit: two subnetworks on one
    unit leave another unit matched to a subnetwork that is not its own."""
    assignment = match_units(share if score is None else score)
    per_unit = [float(share[j, k]) for j, k in enumerate(assignment)]
    recovered = [s > threshold for s in per_unit]
    return {
        "assignment": assignment,
        "matched_share": per_unit,
        "min_matched_share": min(per_unit),
        "recovered": recovered,
        "n_recovered": int(sum(recovered)),
        "n_recovered_at": {str(t): sum(s > t for s in per_unit) for t in SHARE_THRESHOLDS},
        "n_units": len(assignment),
        "all_recovered": all(recovered),
    }


def unit_recovery(impacts: Tensor) -> dict:
    """`recovery` of units from their impacts (n_units, n_v), matched on `matching_score`."""
    return recovery(impact_share(impacts), score=matching_score(impacts))


def parameter_share(directions: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
    """(n_v, n_units): share of each subnetwork's squared norm on each unit's own parameters.

    directions: {param: (n_v, *shape)}; masks: {param: (n_units, *shape) bool} for the params whose
    entries belong to single units (parameters in no mask count towards the total only)."""
    norms = total(d.pow(2).flatten(1).sum(1) for d in directions.values())  # (n_v,)
    own = total(
        torch.einsum("kw,jw->kj", directions[n].pow(2).flatten(1), m.flatten(1).float())
        for n, m in masks.items()
    )
    return own / norms.clamp_min(1e-30)[:, None]


def mmcs(weight: Tensor, directions: Tensor) -> list[float]:
    """Peers' mean-max cosine similarity, per feature: max over subnetworks of |cos| between column
    j of a subnetwork's embedding part and column j of the model's embedding W.

    weight: (hidden, features); directions: (n_v, hidden, features). Sign-free because an L3D
    direction's sign is arbitrary."""
    w = weight / weight.norm(dim=0, keepdim=True).clamp_min(1e-30)
    v = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = torch.einsum("hf,khf->kf", w, v).abs()  # (n_v, features)
    return cos.max(0).values.tolist()


# TMCS coefficient recovery (eq. 12) -----------------------------------------------------------


def coefficient_recovery(
    w_in: Tensor, w_out: Tensor, coefficients: Tensor, live: list[int]
) -> dict:
    """Recover A from each subnetwork's encoder-decoder path (eq. 12) and correlate with the true A.

    w_in: (n_v, hidden, inputs), w_out: (n_v, outputs, hidden) parts of V_out; coefficients:
    A, (outputs, inputs). For subnetwork k the path W_out_k W_in_k (outputs, inputs) is rank 1;
    its largest column names the input i* and that column is a_hat, a multiple of A[:, i*].
    Pearson r pools all live subnetworks (what the paper reports as "r^2 = 0.92")."""
    paths = torch.einsum("koh,khi->koi", w_out, w_in)
    estimates, truths, inputs, per_subnetwork = [], [], [], []
    for k in live:
        i_star = int(paths[k].norm(dim=0).argmax())
        a_hat = paths[k][:, i_star]
        a_hat = a_hat * torch.sign(a_hat.sum())  # a direction's sign is arbitrary
        estimates.append(a_hat)
        truths.append(coefficients[:, i_star])
        inputs.append(i_star)
        per_subnetwork.append(_pearson(a_hat, coefficients[:, i_star]))
    if not estimates:
        return {"pearson_r": float("nan"), "r_squared": float("nan"), "inputs": []}
    r = _pearson(torch.cat(estimates), torch.cat(truths))
    return {
        "pearson_r": r,
        "r_squared": r * r,
        "inputs": inputs,
        "per_subnetwork_r": per_subnetwork,
        "n_inputs_covered": len(set(inputs)),
        "a_hat": torch.stack(estimates).tolist(),
        "a_true": torch.stack(truths).tolist(),
    }


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return float((x * y).sum().item() / denom) if denom > 0 else float("nan")


# Interventions -------------------------------------------------------------------------------


@torch.no_grad()
def output_deltas(
    decomposition: Decomposition,
    inputs: Tensor,
    k: int,
    delta: float,
    params: list[str] | None = None,
) -> Tensor:
    """(n_samples, n_outputs) |f(x, W0 + delta v_k) - f(x, W0)| per output dim (eq. 9), intervening
    only on `params` (default: every decomposed tensor; Fig. S8 uses the hidden layers only)."""
    return _deltas_along(decomposition.target, inputs, decomposition.v_out(k), delta, params)


@torch.no_grad()
def _deltas_along(
    target: Target,
    inputs: Tensor,
    direction: dict[str, Tensor],
    delta: float,
    params: list[str] | None = None,
) -> Tensor:
    moved = target.moved(direction, delta, params)
    return (target.forward(inputs, moved) - target.forward(inputs)).abs().flatten(1)


def output_changes(
    decomposition: Decomposition,
    inputs: Tensor,
    k: int,
    delta: float,
    params: list[str] | None = None,
) -> Tensor:
    """(n_samples,) mean |Δ output| over output dims (see output_deltas)."""
    return output_deltas(decomposition, inputs, k, delta, params).mean(1)


def _ratio_stats(ratios: list[float]) -> dict:
    return {
        "median_ratio": float(np.median(ratios)),
        "min_ratio": float(np.min(ratios)),
        "geomean_ratio": float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-12))))),
    }


def sample_selectivity(
    decomposition: Decomposition,
    inputs: Tensor,
    units: Tensor,
    assignment: list[int],
    deltas: tuple[float, ...] = DELTAS,
    params: list[str] | None = None,
    max_units: int = 20,
) -> dict:
    """Sample-wise: for each unit j (the first max_units) and its subnetwork k, the mean output
    change (over all output dims) on samples where j is active divided by that on samples where it
    is not (Section 3.4.3: "a large impact on the predictions of that sample and a minor impact on
    others"), for +-delta; plus the share of the total change that lands on j's samples. Ratios
    are capped at 1e6 (exact zeros off-target)."""
    active = (inputs.abs() > 0).float() @ units.float().T > 0  # (n_samples, n_units)
    table = {}
    for delta in deltas:
        ratios, shares = [], []
        for j, k in list(enumerate(assignment))[:max_units]:
            on, off = active[:, j], ~active[:, j]
            for sign in (1.0, -1.0):
                change = output_changes(decomposition, inputs, k, sign * delta, params)
                m_on = change[on].mean().item() if on.any() else 0.0
                m_off = change[off].mean().item() if off.any() else 0.0
                ratios.append(min(m_on / max(m_off, 1e-12), 1e6))
                shares.append(m_on / max(m_on + m_off, 1e-30))
        table[str(delta)] = {
            **_ratio_stats(ratios),
            "mean_share_on_matched": float(np.mean(shares)),
        }
    return table


def output_selectivity(
    decomposition: Decomposition,
    inputs: Tensor,
    units: Tensor,
    assignment: list[int],
    deltas: tuple[float, ...] = DELTAS,
    params: list[str] | None = None,
    max_units: int = 20,
) -> dict:
    """Output-wise, for toys whose unit j is input j and output j (TMS, X^2, ResidMLP: the label
    of output j depends on input j alone): intervene along unit j's subnetwork k with +-delta
    (eq. 9) and divide the mean |Δ output_j| by the mean |Δ output_i| over the other outputs i != j
    ("interventions on a subnetwork only successfully affect the expected subset of outputs",
    Section 3.4.3, Figs 9, S8). Both means are over the same samples: "active", those where unit
    j is active (the samples whose prediction the subnetwork serves), and "all" held-out samples
    (an intervention that moves output j everywhere counts too). Ratios capped at 1e6.

    units: (n_units, n_features) bool with n_features = n_outputs (matched output set of unit j =
    its input set); returns {"active" | "all": {str(delta): ratio stats}}."""
    directions = [(j, decomposition.v_out(k)) for j, k in list(enumerate(assignment))[:max_units]]
    return _output_selectivity(decomposition.target, inputs, units, directions, deltas, params)


def gradient_output_selectivity(
    decomposition: Decomposition,
    inputs: Tensor,
    units: Tensor,
    deltas: tuple[float, ...] = DELTAS,
    params: list[str] | None = None,
    max_units: int = 20,
) -> dict:
    """output_selectivity of the model's own direction for each unit instead of a subnetwork: the
    unit vector u_j (over `params`, default every decomposed tensor) that moves output j most to
    first order on j's samples, the top right singular vector of the per-sample gradients
    grad_W f_j(x) over samples where unit j is active. This is the direction L3D's subnetwork for j
    should span (its gradients on j's samples are along grad_W f_j where the other outputs sit at
    the reference), so it tells how selective a faithful subnetwork can be on this toy."""
    target = decomposition.target
    names = params if params is not None else list(target.w0)
    active = (inputs.abs() > 0).float() @ units.float().T > 0  # (n_samples, n_units)
    directions = []
    for j in range(min(units.shape[0], max_units)):
        xs = inputs[active[:, j]]
        if not len(xs):
            continue
        outputs_j = units[j]

        def f_j(p: dict[str, Tensor], xs: Tensor = xs, mine: Tensor = outputs_j) -> Tensor:
            return target.forward(xs, {**target.w0, **p})[:, mine].sum(1)  # (n_j,)

        jac = torch.func.jacrev(f_j)({n: target.w0[n] for n in names})
        g = torch.cat([jac[n].flatten(1) for n in names], 1)  # (n_j, n_w)
        u = torch.linalg.svd(g, full_matrices=False).Vh[0]
        direction, start = {}, 0
        for n in names:
            direction[n] = u[start : start + target.w0[n].numel()].reshape(target.w0[n].shape)
            start += target.w0[n].numel()
        directions.append((j, direction))
    return _output_selectivity(target, inputs, units, directions, deltas, params)


def _output_selectivity(
    target: Target,
    inputs: Tensor,
    units: Tensor,
    directions: list[tuple[int, dict[str, Tensor]]],
    deltas: tuple[float, ...],
    params: list[str] | None,
) -> dict:
    """directions: (unit j, j's intervention direction) pairs; see output_selectivity."""
    n_outputs = target.forward(inputs[:1]).flatten(1).shape[1]
    if units.shape[1] != n_outputs:
        raise L3DError(
            f"output_selectivity needs one output per input feature, got {units.shape[1]} "
            f"features and {n_outputs} outputs: use sample_selectivity for this toy"
        )
    active = (inputs.abs() > 0).float() @ units.float().T > 0  # (n_samples, n_units)
    groups = {"active": lambda j: active[:, j], "all": lambda j: torch.ones_like(active[:, j])}
    ratios: dict = {g: {str(d): [] for d in deltas} for g in groups}
    for delta in deltas:
        for j, direction in directions:
            mine = units[j]
            for sign in (1.0, -1.0):
                change = _deltas_along(target, inputs, direction, sign * delta, params)
                for g, rows in groups.items():
                    sub = change[rows(j)]
                    if not len(sub):
                        continue
                    m_on, m_off = sub[:, mine].mean().item(), sub[:, ~mine].mean().item()
                    ratios[g][str(delta)].append(min(m_on / max(m_off, 1e-12), 1e6))
    return {g: {d: _ratio_stats(r) for d, r in table.items() if r} for g, table in ratios.items()}


@torch.no_grad()
def intervention_grid(
    decomposition: Decomposition,
    inputs: Tensor,
    units: Tensor,
    pair: tuple[int, int],
    assignment: list[int],
    deltas: Tensor,
) -> dict:
    """Fig. S9: intervene on two units' subnetworks at once over a delta x delta grid; the mean
    output change on samples where only the first unit, only the second, or neither is active."""
    target = decomposition.target
    (j1, j2), (k1, k2) = pair, (assignment[pair[0]], assignment[pair[1]])
    v1, v2 = decomposition.v_out(k1), decomposition.v_out(k2)
    owner = single_unit_samples(inputs, units)
    groups = {"only_first": owner == j1, "only_second": owner == j2}
    groups["neither"] = ~(inputs.abs() > 0).float().matmul(units[[j1, j2]].float().T).bool().any(1)
    before = target.forward(inputs)
    grids = {g: torch.zeros(len(deltas), len(deltas)) for g in groups}
    for a, d1 in enumerate(deltas.tolist()):
        for b, d2 in enumerate(deltas.tolist()):
            moved = {n: w + d1 * v1[n] + d2 * v2[n] for n, w in target.w0.items()}
            change = (target.forward(inputs, moved) - before).abs().flatten(1).mean(1)
            for g, mask in groups.items():
                grids[g][a, b] = change[mask].mean() if mask.any() else 0.0
    return {
        "units": [j1, j2],
        "subnetworks": [k1, k2],
        "deltas": deltas.tolist(),
        **{g: grid.tolist() for g, grid in grids.items()},
    }


@torch.no_grad()
def one_hot_probe(
    decomposition: Decomposition, units: Tensor, value: float = 0.75, tols: tuple = (0.1, 0.2)
) -> dict:
    """Peers' one-hot probe: each unit's features set to `value`, the rest 0; attribution |c_k|
    with the all-zero input's output as reference; rows normalised to max 1. Errors (peer
    convention) after Hungarian matching: off-diagonal entries above tol plus matched entries
    below 1 - tol, counted over all subnetworks."""
    probes = units.float() * value
    references = decomposition.target.outputs(torch.zeros_like(probes))
    attribution = decomposition.coefficients(probes, references=references).abs()
    normed = attribution / attribution.max(1, keepdim=True).values.clamp_min(1e-30)
    assignment = match_units(normed)
    errors = {}
    for tol in tols:
        on = torch.zeros_like(normed, dtype=torch.bool)
        on[torch.arange(len(assignment)), torch.tensor(assignment)] = True
        n_err = int((normed[on] < 1 - tol).sum() + (normed[~on] > tol).sum())
        errors[str(tol)] = n_err
    return {"attribution": normed.tolist(), "assignment": assignment, "errors": errors}


@torch.no_grad()
def ablation_check(
    decomposition: Decomposition,
    inputs: Tensor,
    deltas: tuple[float, ...] = (0.5, 1.0),
    seed: int = 0,
) -> dict:
    """Answer to the critique of first-order attribution: for each held-out sample, perturbing along
    the subnetworks L3D calls active for it (batch top-k over the held-out set, random references)
    should move its output far more than perturbing along the ones it calls inactive. Pooled over
    all (sample, subnetwork) pairs and per sample (`per_sample`; seed: its random inactive
    subnetworks)."""
    coeffs = decomposition.coefficients(inputs)
    active = batch_top_k(coeffs, decomposition.config.top_k)  # (n_samples, n_v)
    out = {}
    for delta in deltas:
        changes = torch.stack(
            [
                (
                    output_changes(decomposition, inputs, k, delta)
                    + output_changes(decomposition, inputs, k, -delta)
                )
                / 2
                for k in range(decomposition.n_subnetworks)
            ],
            dim=1,
        )  # (n_samples, n_v)
        m_active = changes[active].mean().item() if active.any() else 0.0
        m_inactive = changes[~active].mean().item() if (~active).any() else 0.0
        out[str(delta)] = {
            "mean_change_active": m_active,
            "mean_change_inactive": m_inactive,
            "ratio": m_active / max(m_inactive, 1e-12),
            "per_sample": _per_sample_ablation(coeffs, active, changes, seed),
        }
    return out


def _per_sample_ablation(coeffs: Tensor, active: Tensor, changes: Tensor, seed: int) -> dict:
    """The pooled ratio can be carried by a few samples; here each sample compares its own
    top-active subnetwork (largest |c| among the active) with one random inactive subnetwork.

    coeffs, active, changes: (n_samples, n_v)."""
    both = active.any(1) & (~active).any(1)
    top = coeffs.abs().masked_fill(~active, -1.0).argmax(1)
    draw = torch.rand(active.shape, generator=torch.Generator().manual_seed(seed))
    other = draw.masked_fill(active, -1.0).argmax(1)  # uniform among the inactive ones
    rows = torch.arange(len(coeffs))[both]
    moved_top, moved_other = changes[rows, top[rows]], changes[rows, other[rows]]
    if len(rows) == 0:
        return {
            "n_samples": 0,
            "median_ratio": float("nan"),
            "fraction_active_larger": float("nan"),
        }
    return {
        "n_samples": len(rows),
        "median_ratio": float((moved_top / moved_other.clamp_min(1e-12)).median()),
        "fraction_active_larger": float((moved_top > moved_other).float().mean()),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs dropped."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
