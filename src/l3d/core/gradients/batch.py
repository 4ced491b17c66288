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

from l3d.core.samples import SampleRows
from l3d.core.subnetworks import Subnetworks, total
from l3d.errors import L3DError


def all_zero(finder: str) -> L3DError:
    """The one line for data whose per-sample gradients are all zero (`finder`: what found
    them so, e.g. "the first epoch found"): any decomposition of them has loss 0 and means
    nothing."""
    return L3DError(
        f"{finder} every per-sample gradient zero, so there is nothing to decompose. The "
        "outputs do not depend on the params decomposed (is each one used in forward?), or the "
        "divergence is constant (KL over a single output is always 0): choose other params, or "
        "another divergence"
    )


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

    def nbytes(self) -> int:
        """Memory the batch's gradients (or the signals they are formed from) take."""
        ...

    def kept_bytes(self, n_subnetworks: int, ranks: dict[str, int]) -> int:
        """Memory that projecting the batch onto V_in and V_out (n_subnetworks, `ranks` per
        tensor) keeps for the step's backward, beyond the batch and the factors."""
        ...


def check_finite_gradients(grads: dict[str, Tensor]) -> None:
    """Refuse per-sample gradients {name: tensor} with NaN/inf. One flag for all tensors, so a
    batch costs one host synchronisation (on a GPU), not one per tensor."""
    if not grads:
        return
    finite = torch.stack([torch.isfinite(g).all() for g in grads.values()])
    if not finite.all():
        name = list(grads)[int(finite.logical_not().nonzero()[0])]
        raise L3DError(
            f"per-sample gradients of '{name}' contain NaN/inf: the model or divergence is "
            "not finite at W0 on this batch (check inputs, logits and log-probabilities)"
        )


def sample_index(rows: SampleRows, batch: int) -> tuple[Tensor | None, int]:
    """(index, n_samples) of a batch of `batch` inputs: index holds the sample rows' flat
    (input * seq + position) indices with per-token samples, and is None when every position (or,
    without per_token, every input) is a sample. Gathering with it replaces boolean-mask indexing,
    which synchronises with the host on every call: this costs one synchronisation per batch."""
    if rows.mask is None:
        return None, batch
    index = rows.mask.flatten().nonzero().squeeze(1)
    n_samples = len(index)
    return (None if n_samples == rows.mask.numel() else index), n_samples


def to_rows(x: Tensor, rows: SampleRows, index: Tensor | None) -> Tensor:
    """(batch, seq, ...) -> (n_samples, ...) with per-token samples, given `sample_index(rows)`;
    unchanged (batch, ...) without."""
    if not rows.per_token:
        return x
    x = x.flatten(0, 1)
    return x if index is None else x.index_select(0, index)


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
            check_finite_gradients(self.grads)

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

    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.grads.values())

    def kept_bytes(self, n_subnetworks: int, ranks: dict[str, int]) -> int:
        return 0  # the contractions' backward reads the gradients and factors themselves


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

    def nbytes(self) -> int:
        """Over all chunks (one is in memory at a time)."""
        return sum(chunk.nbytes() for chunk in self.chunks())

    def kept_bytes(self, n_subnetworks: int, ranks: dict[str, int]) -> int:
        """Over all chunks (one chunk's graph is kept at a time)."""
        return sum(chunk.kept_bytes(n_subnetworks, ranks) for chunk in self.chunks())
