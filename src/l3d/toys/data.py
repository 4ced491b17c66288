"""Sparse feature data of the paper's toy models (Appendix B.3)."""

from __future__ import annotations

import torch
from torch import Tensor


def sparse_features(
    n_samples: int,
    n_features: int,
    p_active: float = 0.05,
    low: float = 0.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n_samples, n_features): each feature active with probability p_active, value U[low, high];
    rows with no active feature are redrawn (as the authors' code does)."""
    generator = generator or torch.Generator().manual_seed(0)
    x = torch.zeros(n_samples, n_features)
    todo = torch.arange(n_samples)
    while len(todo):
        active = torch.rand(len(todo), n_features, generator=generator) < p_active
        values = low + (high - low) * torch.rand(len(todo), n_features, generator=generator)
        x[todo] = values * active
        todo = todo[~active.any(1)]
    return x
