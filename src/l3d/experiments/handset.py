"""The hand-set decomposition of a toy: one subnetwork per ground-truth unit (and per sign where
the toy's inputs take both), set to the exact per-sample gradient direction of an input in which
only that unit is active: the planted answer. Where the units' gradient directions are nearly
orthogonal (TMS, ResidMLP) it is what a decomposition that found every circuit scores, so a purity
target it misses is a limit of the toy or of the metric, not of training. Where they overlap
(TMCS, higher-rank, X²: every input reaches every output through shared hidden units), its
projections mix the units and a learned V_in does better; there only its coefficient recovery
(eq. 12) is a ceiling (docs/toys.md, "The hand-set solution")."""

from __future__ import annotations

import torch
from torch import Tensor

from l3d.core.algorithm import SubnetworkPair
from l3d.core.resampling import set_direction_
from l3d.core.subnetworks import Subnetworks
from l3d.decomposition import Decomposition
from l3d.errors import L3DError
from l3d.toys.registry import Toy

PROBE_VALUE = 0.75
"""A unit's active features in its probe input (the peers' one-hot probe value)."""


def unit_probes(toy: Toy, data: Tensor) -> Tensor:
    """(n_units * n_signs, n_features): each unit's features at +PROBE_VALUE, the rest 0, and the
    same at -PROBE_VALUE when `data` has negative inputs (ResidMLP: x_j > 0 and x_j < 0 switch on
    disjoint neurons, so a feature has one circuit per sign)."""
    units = toy.units.float() * PROBE_VALUE
    return torch.cat([units, -units]) if bool((data < 0).any()) else units


@torch.no_grad()
def hand_set_decomposition(toy: Toy, like: Decomposition, data: Tensor, seed: int) -> Decomposition:
    """Subnetwork j = the gradient of the divergence between f(probe_j) and the all-zero input's
    output (the one-hot probe's reference), at `like`'s ranks (best fit per tensor, as resampling
    sets a direction) and unit norm; V_in = V_out, so c_j is the projection on it. `like`'s
    divergence, loss and factorisation are kept, and its top_k is rescaled so that as many
    subnetworks per sample stay active. Evaluated on `data` (its `evaluation`)."""
    if like.config.factorization != "cp":
        raise L3DError("the hand-set decomposition is built from CP factors: use factorization=cp")
    probes = unit_probes(toy, data).to(like.device)
    references = like.target.outputs(torch.zeros_like(probes))
    generator = torch.Generator().manual_seed(seed)
    grads = like.gradient_source(probes).batch(probes, references, generator).dense()
    v = like.subnetworks.v_out
    n_v = len(probes)
    v_out = Subnetworks(v.shapes, n_v, v.ranks, "cp").to(like.device)
    for k in range(n_v):
        set_direction_(v_out, k, {name: grads[name][k] for name in v.names})
    v_out.normalize_()
    v_in = Subnetworks(v.shapes, n_v, v.ranks, "cp").to(like.device)
    v_in.copy_(v_out)
    top_k = min(1.0, like.config.top_k * like.n_subnetworks / n_v)
    config = like.config.replace(n_subnetworks=n_v, top_k=top_k, init="random")
    hand_set = Decomposition(
        config,
        SubnetworkPair(v_in, v_out),
        history=[],
        evaluation=like.evaluation,  # replaced below: evaluating needs the decomposition itself
        model=like.model,
        divergence=like.divergence,
        reference=like.reference,
    )
    hand_set.evaluation = hand_set.evaluate(data, seed)
    return hand_set
