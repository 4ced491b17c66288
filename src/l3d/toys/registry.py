"""The named toys of the paper's experiments (Section 3, plus the peers' ResidMLP): how to make
each toy model, sample its data and train it, and its ground-truth units. Run configs name them
(`model: {toy: tms}`), the experiments (l3d.experiments) decompose them, and the TMS demo trains
one.

Trained toys are cached (safetensors + JSON, written atomically) under $L3D_CACHE or ~/.cache/l3d.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from l3d.errors import L3DError, lookup
from l3d.io import load_tensors, save_tensors, write_json
from l3d.toys.data import feature_groups, grouped_features, sparse_features
from l3d.toys.higher_rank import higher_rank_model
from l3d.toys.resid_mlp import ResidMLP, resid_mlp_labels
from l3d.toys.squares import Squares
from l3d.toys.tmcs import TMCS, coefficient_matrix
from l3d.toys.tms import TMS, train_toy


@dataclass(frozen=True)
class Toy:
    """A trained toy model and its ground truth."""

    model: nn.Module
    units: Tensor
    """(n_units, n_features) bool: the input features of each ground-truth circuit."""
    sample: Callable[[int, torch.Generator], Tensor]
    """Draw n inputs from the toy's data distribution."""
    info: dict = field(default_factory=dict)
    """Toy-specific ground truth (TMCS: the coefficient matrix 'A') and training record."""


@dataclass(frozen=True)
class ToySpec:
    """How to make, feed and train one named toy."""

    name: str
    description: str
    make: Callable[[int], tuple[nn.Module, Callable[[Tensor], Tensor], dict]]
    """seed -> (untrained model, input -> label function, ground-truth info)."""
    sample: Callable[[int, torch.Generator], Tensor]
    units: Tensor
    train: dict = field(default_factory=dict)
    """train_toy keyword arguments."""
    check: Callable[[nn.Module], str | None] | None = None
    """Returns why a trained toy is unusable (retrain with another init), or None."""


def _tms_check(model: nn.Module) -> str | None:
    norms = cast(TMS, model).W_in.detach().norm(dim=0)  # _tms's make() builds a TMS
    weak = [int(j) for j in torch.nonzero(norms < 0.5).flatten()]
    return f"features {weak} not embedded (W_in column norm < 0.5)" if weak else None


def _tmcs_make(n_inputs: int, n_hidden: int, n_outputs: int):
    def make(seed: int):
        a = coefficient_matrix(n_inputs, n_outputs, seed=seed + 10_000)
        model = TMCS(n_inputs, n_hidden, n_outputs, seed=seed)
        return model, lambda x: x @ a.T, {"A": a}

    return make


def _higher_rank_make(n_groups: int, group_size: int, n_hidden: int):
    def make(seed: int):
        n = n_groups * group_size
        a = coefficient_matrix(n, n, seed=seed + 10_000)
        model = higher_rank_model(n_groups, group_size, n_hidden, seed=seed)
        return model, lambda x: x @ a.T, {"A": a}

    return make


def _sparse(n_features: int, p_active: float = 0.05, low: float = 0.0):
    def sample(n: int, generator: torch.Generator) -> Tensor:
        return sparse_features(n, n_features, p_active, low, 1.0, generator)

    return sample


def _grouped(n_groups: int, group_size: int):
    def sample(n: int, generator: torch.Generator) -> Tensor:
        return grouped_features(n, n_groups, group_size, 0.05, 0.0, 1.0, generator)

    return sample


_TRAIN = {"steps": 5000, "batch_size": 1024, "lr": 5e-3, "weight_decay": 0.01}


def _tms(name: str, description: str, n_features: int, n_hidden: int, **train) -> ToySpec:
    """A toy model of superposition, trained with tied weights; retrained from another
    initialisation when a feature is left unembedded."""
    return ToySpec(
        name=name,
        description=description,
        make=lambda seed: (TMS(n_features, n_hidden, seed=seed), lambda x: x, {}),
        sample=_sparse(n_features),
        units=feature_groups(n_features),
        train={**_TRAIN, **train, "tied": True},
        check=_tms_check,
    )


def _squares(name: str, description: str, width: int) -> ToySpec:
    """X -> X^2 (Section 3.4) with 4 hidden GeLU layers of `width`."""
    return ToySpec(
        name=name,
        description=description,
        make=lambda seed: (Squares(width=width, seed=seed), lambda x: x.pow(2), {}),
        sample=_sparse(5, low=-1.0),
        units=feature_groups(5),
        train={**_TRAIN, "steps": 10000},
    )


TOYS: dict[str, ToySpec] = {
    spec.name: spec
    for spec in [
        _tms("tms", "Toy model of superposition, 5 features in 2 dims (Section 3.1)", 5, 2),
        _tms(
            "tms40",
            "Toy model of superposition, 40 features in 10 dims (peers' TMS 40-10)",
            40,
            10,
            steps=10000,
        ),
        ToySpec(
            name="tmcs",
            description="Toy model of circuit superposition, 10 -> 5 -> 10, y = A x (Section 3.2)",
            make=_tmcs_make(10, 5, 10),
            sample=_sparse(10),
            units=feature_groups(10),
            train=dict(_TRAIN),
        ),
        ToySpec(
            name="higher_rank",
            description="Higher-rank circuits: 25 inputs in 5 groups active together (Section 3.3)",
            make=_higher_rank_make(5, 5, 10),
            sample=_grouped(5, 5),
            units=feature_groups(25, 5),
            train=dict(_TRAIN),
        ),
        _squares("squares", "X -> X^2: 5 inputs, 4 hidden GeLU layers of 5 (Section 3.4)", 5),
        # Not in the paper: with 5-wide hidden layers the parameters that compute x_j^2 also
        # move the other outputs, so even the model's own gradient directions are barely
        # output-selective (docs/toys.md, X^2); 10-wide layers leave room for separate circuits.
        _squares("squares_wide", "X -> X^2 with 4 hidden GeLU layers of 10 (not in the paper)", 10),
        ToySpec(
            name="resid_mlp",
            description="Peers' compressed computation: 100 features, residual 1000, MLP 50",
            # No biases, as the peers' model: a shared bias's gradient mixes every feature.
            make=lambda seed: (ResidMLP(seed=seed, bias=False), resid_mlp_labels, {}),
            sample=_sparse(100, p_active=0.01, low=-1.0),
            units=feature_groups(100),
            train={**_TRAIN, "steps": 4000, "batch_size": 256, "lr": 3e-3},
        ),
    ]
}


def get_toy(name: str) -> ToySpec:
    """The toy named `name` (tms, tms40, tmcs, higher_rank, squares, ...)."""
    return lookup(TOYS, name, "toy")


def cache_dir() -> Path:
    """Where trained toys are kept: $L3D_CACHE/toys or ~/.cache/l3d/toys."""
    return Path(os.environ.get("L3D_CACHE", Path.home() / ".cache" / "l3d")) / "toys"


def train_toy_model(
    spec: ToySpec, seed: int, *, max_attempts: int = 5, cache: Path | None = None
) -> Toy:
    """The toy for `seed`, trained (or loaded from `cache`, default cache_dir()). Data and labels
    come from `seed`; a toy that fails the spec's check (e.g. a TMS feature left unembedded) is
    retrained from another initialisation, and the attempts are recorded in info."""
    key = json.dumps({"name": spec.name, "seed": seed, "train": spec.train}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = (cache or cache_dir()) / f"{spec.name}-seed{seed}-{digest}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        model, _, info = spec.make(meta["init_seed"])
        model.load_state_dict(load_tensors(path, "cached toy weights"))
        return Toy(model.eval(), spec.units, spec.sample, {**info, **meta})
    x = spec.sample(10_000, torch.Generator().manual_seed(seed))
    rejected = []
    for attempt in range(max_attempts):
        init_seed = seed + 1000 * attempt
        model, label, info = spec.make(init_seed)
        log = train_toy(model, x, label(x), seed=seed, **spec.train)
        problem = spec.check(model) if spec.check else None
        if problem is None:
            break
        rejected.append({"init_seed": init_seed, "problem": problem})
    else:
        raise L3DError(
            f"toy '{spec.name}' seed {seed} failed its check in {max_attempts} attempts "
            f"({rejected[-1]['problem']}): change the training recipe in l3d.toys.registry"
        )
    meta = {"init_seed": init_seed, "train_loss": log[-1], "rejected_inits": rejected}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, model.state_dict())  # weights first: the JSON beside them commits the entry
    write_json(meta_path, meta)
    return Toy(model.eval(), spec.units, spec.sample, {**info, **meta})
