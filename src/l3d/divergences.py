"""Divergences D(y_i, y_ref) between one sample's output and a reference output (Section 2.2),
and the strategies that choose the reference.

A divergence takes one sample's output and one reference, both shaped (n_out,), and returns a
scalar. References always live in the model's output space (logits for 'kl') and are detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from l3d.errors import L3DError

Divergence = Callable[[Tensor, Tensor], Tensor]
# (outputs (n, n_out), generator) -> references (n, n_out)
ReferenceFn = Callable[[Tensor, torch.Generator], Tensor]


def mse(output: Tensor, reference: Tensor) -> Tensor:
    """Mean over output dims of (y_i - y_ref)^2: the paper's toy-model divergence."""
    return (output - reference).pow(2).mean()


def mse_authors(output: Tensor, reference: Tensor) -> Tensor:
    """1/2 MSE(y_i, y_ref) + 1/2 MSE(y_i, 0): the gradient the authors' toy code decomposes.

    A missing `.detach()` on the reference there makes the decomposed gradient that of this
    expression rather than of MSE to the reference (docs/algorithm.md, divergences). Its gradient in y_i, (2 y_i - y_ref) / n_out, is that of MSE(y_i, y_ref / 2):
    the sample's own output weighs twice the reference's. An option for matching the published toy
    numbers; 'mse' (the paper's definition) stays the default.
    """
    return 0.5 * mse(output, reference) + 0.5 * output.pow(2).mean()


def kl(output: Tensor, reference: Tensor) -> Tensor:
    """KL(p_ref || p_i) with both given as logits, as for the paper's LM and CNN runs."""
    log_p = F.log_softmax(output, dim=-1)
    log_ref = F.log_softmax(reference, dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum()


DIVERGENCES: dict[str, Divergence] = {"mse": mse, "mse_authors": mse_authors, "kl": kl}


def random_other(outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Each sample's reference is another sample of the batch, uniformly, never itself (Section 2.2)."""
    n = outputs.shape[0]
    shift = torch.randint(1, n, (n,), generator=generator)
    return outputs[(torch.arange(n) + shift) % n]


def batch_mean(divergence: str) -> ReferenceFn:
    """The batch-mean output (mean probabilities for 'kl', returned as their log)."""

    def reference(outputs: Tensor, generator: torch.Generator) -> Tensor:
        mean = F.softmax(outputs, dim=-1).mean(0).log() if divergence == "kl" else outputs.mean(0)
        return mean.expand_as(outputs)

    return reference


def uniform(divergence: str) -> ReferenceFn:
    """A uniform output: the uniform distribution for 'kl', else a constant at the batch's mean value."""

    def reference(outputs: Tensor, generator: torch.Generator) -> Tensor:
        if divergence == "kl":
            return torch.zeros_like(outputs)
        return torch.full_like(outputs, outputs.mean().item())

    return reference


def resolve_divergence(divergence: str | Divergence) -> tuple[str, Divergence]:
    """(config name, callable) for a built-in name or a user callable."""
    if callable(divergence):
        return f"custom:{getattr(divergence, '__name__', type(divergence).__name__)}", divergence
    if divergence in DIVERGENCES:
        return divergence, DIVERGENCES[divergence]
    raise L3DError(
        f"unknown divergence '{divergence}': use 'mse', 'mse_authors', 'kl' or a callable "
        "(output, reference) -> scalar"
    )


def resolve_reference(
    reference: str | ReferenceFn, divergence_name: str
) -> tuple[str, ReferenceFn]:
    if callable(reference):
        return f"custom:{getattr(reference, '__name__', type(reference).__name__)}", reference
    builtin = divergence_name if divergence_name in DIVERGENCES else "mse"
    strategies = {
        "random": random_other,
        "mean": batch_mean(builtin),
        "uniform": uniform(builtin),
    }
    if reference in strategies:
        return reference, strategies[reference]
    raise L3DError(
        f"unknown reference '{reference}': use 'random', 'mean', 'uniform' or a callable "
        "(outputs (n, n_out), generator) -> references (n, n_out)"
    )


def check_divergence(divergence: Divergence, output: Tensor, reference: Tensor) -> None:
    """Call the divergence once on real data so a wrong shape fails here, with a clear message."""
    try:
        value = divergence(output, reference)
    except Exception as err:
        raise L3DError(
            f"the divergence failed on one sample's output of shape {tuple(output.shape)}: {err}"
        ) from err
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise L3DError(
            f"the divergence must return a scalar tensor for one sample (output shape "
            f"{tuple(output.shape)}), but returned {shape}; reduce over output dims, e.g. .mean()"
        )
