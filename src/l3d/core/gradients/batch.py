"""What a training step needs from one batch of per-sample gradients, and its dense form.

Every backend (torchfunc, jacobian, structured) hands the algorithm a `GradientBatch`: it only has
to project gradients onto subnetworks and report their squared norms, so the structured backend
never materialises the (samples x parameters) array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from l3d.core.subnetworks import Subnetworks, total
from l3d.errors import L3DError


class GradientBatch(Protocol):
    """One batch of per-sample gradients g_i, (n_samples, n_w) in some form."""

    n_samples: int

    def project(self, subnetworks: Subnetworks) -> Tensor:
        """<V_k, g_i> for every sample and subnetwork, (n_samples, n_v), differentiable in V."""
        ...

    def sq_norms(self) -> Tensor:
        """||g_i||^2, (n_samples,)."""
        ...

    def dense(self) -> dict[str, Tensor]:
        """The gradients themselves, {name: (n_samples, *shape)}: for resampling's residuals,
        which need one sample's whole gradient (costs n_samples x n_w memory)."""
        ...


def check_finite_gradients(g: Tensor, name: str) -> None:
    if not torch.isfinite(g).all():
        raise L3DError(
            f"per-sample gradients of '{name}' contain NaN/inf: the model or divergence is "
            "not finite at W0 on this batch (check inputs, logits and log-probabilities)"
        )


@dataclass
class DenseGradients:
    """Materialised per-sample gradients {name: (n_samples, *param_shape)}.

    flat: the same gradients as one (n_samples, n_w) matrix, tensors concatenated in `grads` order
    (built on first use), so that small problems can project with one matrix product.
    """

    grads: dict[str, Tensor]
    flat: Tensor | None = None
    check_finite: bool = True
    n_samples: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_samples = next(iter(self.grads.values())).shape[0]
        self._sq_norms: Tensor | None = None
        if self.check_finite:
            for name, g in self.grads.items():
                check_finite_gradients(g, name)

    @classmethod
    def from_flat(
        cls, flat: Tensor, shapes: dict[str, tuple[int, ...]], check_finite: bool = True
    ) -> DenseGradients:
        """Views into one (n_samples, n_w) matrix as {name: (n_samples, *shape)}."""
        sizes = [math.prod(s) for s in shapes.values()]
        grads = {
            name: g.view(flat.shape[0], *shape)
            for (name, shape), g in zip(shapes.items(), flat.split(sizes, dim=1))
        }
        return cls(grads, flat, check_finite)

    def flatten(self) -> Tensor:
        """(n_samples, n_w)."""
        if self.flat is None:
            self.flat = torch.cat([g.flatten(1) for g in self.grads.values()], dim=1)
        return self.flat

    def project(self, subnetworks: Subnetworks) -> Tensor:
        return subnetworks.inner(self.grads)

    def sq_norms(self) -> Tensor:
        if self._sq_norms is None:
            self._sq_norms = total(g.flatten(1).pow(2).sum(1) for g in self.grads.values())
        return self._sq_norms

    def dense(self) -> dict[str, Tensor]:
        return self.grads


@dataclass
class ChunkedGradients:
    """One batch whose gradient signals are computed one sample chunk at a time, so that only one
    chunk's activations and signals are in memory (`L3DConfig.chunk_size` on the structured path).

    parts[j]() recomputes chunk j's GradientBatch (its forward and backward) every time it is
    called: a training step takes two passes over the chunks (algorithm.chunked_step).
    """

    parts: Sequence[Callable[[], GradientBatch]]
    n_samples: int

    def chunks(self) -> Iterator[GradientBatch]:
        for part in self.parts:
            yield part()

    def project(self, subnetworks: Subnetworks) -> Tensor:
        return torch.cat([chunk.project(subnetworks) for chunk in self.chunks()])

    def sq_norms(self) -> Tensor:
        return torch.cat([chunk.sq_norms() for chunk in self.chunks()])

    def dense(self) -> dict[str, Tensor]:
        parts = [chunk.dense() for chunk in self.chunks()]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
