"""Sparse feature data of the paper's toy models (Appendix B.3) and of the peers' ResidMLP."""

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
    return grouped_features(n_samples, n_features, 1, p_active, low, high, generator)


def grouped_features(
    n_samples: int,
    n_groups: int,
    group_size: int,
    p_active: float = 0.05,
    low: float = 0.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n_samples, n_groups * group_size): features 0..group_size-1, group_size..2*group_size-1, ...
    are active or inactive together (Section 3.3), each group with probability p_active, every
    active feature's value drawn U[low, high]; rows with no active group are redrawn."""
    generator = generator or torch.Generator().manual_seed(0)
    x = torch.zeros(n_samples, n_groups * group_size)
    todo = torch.arange(n_samples)
    while len(todo):
        active = torch.rand(len(todo), n_groups, generator=generator) < p_active
        values = low + (high - low) * torch.rand(
            len(todo), n_groups * group_size, generator=generator
        )
        x[todo] = values * active.repeat_interleave(group_size, dim=1)
        todo = todo[~active.any(1)]
    return x


def feature_groups(n_features: int, group_size: int = 1) -> Tensor:
    """(n_groups, n_features) bool: which input features make up each ground-truth unit."""
    n_groups = n_features // group_size
    return torch.eye(n_groups, dtype=torch.bool).repeat_interleave(group_size, dim=1)
