"""Divergences D(y_i, y_ref) between one sample's output and a reference output (Section 2.2),
and the strategies that choose the reference, as objects in one registry each.

A divergence function takes one sample's output and one reference, both shaped (n_out,), and
returns a scalar. References always live in the model's output space (logits for 'kl') and are
detached. A `Divergence` also says how its outputs are read (probabilities or raw values) and
which distance measures how far an intervention moves an output (Section 2.5, eq. 9): adding a
divergence is one entry in `DIVERGENCES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from l3d.core.samples import SampleRows
from l3d.errors import L3DError, lookup

DivergenceFn = Callable[[Tensor, Tensor], Tensor]
# (outputs (n, n_out), generator) -> references (n, n_out)
ReferenceFn = Callable[[Tensor, torch.Generator], Tensor]

CUSTOM = "custom:"


def mse(output: Tensor, reference: Tensor) -> Tensor:
    """Mean over output dims of (y_i - y_ref)^2: the paper's toy-model divergence."""
    return (output - reference).pow(2).mean()


def mse_authors(output: Tensor, reference: Tensor) -> Tensor:
    """1/2 MSE(y_i, y_ref) + 1/2 MSE(y_i, 0): the gradient the authors' toy code decomposes.

    A missing `.detach()` on the reference there makes the decomposed gradient that of this
    expression rather than of MSE to the reference (docs/authors-code.md). Its gradient in y_i,
    (2 y_i - y_ref) / n_out, is that of MSE(y_i, y_ref / 2): the sample's own output weighs twice
    the reference's. An option for matching the published toy numbers; 'mse' stays the default.
    """
    return 0.5 * mse(output, reference) + 0.5 * output.pow(2).mean()


def kl(output: Tensor, reference: Tensor) -> Tensor:
    """KL(p_ref || p_i) with both given as logits, as for the paper's LM and CNN runs."""
    log_p = F.log_softmax(output, dim=-1)
    log_ref = F.log_softmax(reference, dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum()


@dataclass(frozen=True)
class Divergence:
    """One divergence: its function, how its outputs are read, and its intervention distance."""

    name: str
    """As recorded in L3DConfig.divergence ('custom:<name>' for a user callable)."""
    fn: DivergenceFn
    on_probabilities: bool
    """Outputs are logits of a distribution: references are averaged as probabilities, the
    uniform reference is the uniform distribution, and outputs are read through softmax."""
    distance_fn: DivergenceFn
    """distance(moved, base): how far an intervention moved one output; 0 when moved == base."""

    def __call__(self, output: Tensor, reference: Tensor) -> Tensor:
        return self.fn(output, reference)

    def read(self, outputs: Tensor) -> Tensor:
        """Outputs as the divergence sees them: probabilities over the last axis, or raw values."""
        return F.softmax(outputs, dim=-1) if self.on_probabilities else outputs

    def distance(self, moved: Tensor, base: Tensor) -> Tensor:
        """Per-row distance of (n, n_out) outputs: KL(p_base || p_moved) or the mean squared
        change, (n,). Zero at moved == base for every built-in divergence."""
        return torch.vmap(self.distance_fn)(moved, base)

    @property
    def change_label(self) -> str:
        """What `distance` measures, for tables and plots."""
        return "KL" if self.on_probabilities else "mean squared output change"

    @property
    def derivative_label(self) -> str:
        """What a derivative of `read(outputs)` along a subnetwork is, for tables and plots."""
        return "d softmax/dδ" if self.on_probabilities else "d output/dδ"

    def check(self, output: Tensor, reference: Tensor) -> None:
        """Call the function once on real data so a wrong shape fails here, with a clear message."""
        try:
            value = self.fn(output, reference)
        except Exception as err:
            raise L3DError(
                f"the divergence failed on one sample's output of shape {tuple(output.shape)}: "
                f"{err}"
            ) from err
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise L3DError(
                f"the divergence must return a scalar tensor for one sample (output shape "
                f"{tuple(output.shape)}), but returned {shape}; reduce over output dims, "
                "e.g. .mean()"
            )


DIVERGENCES: dict[str, Divergence] = {
    "mse": Divergence("mse", mse, on_probabilities=False, distance_fn=mse),
    # Its own value is not 0 at equal outputs (the 1/2 MSE to 0 term): interventions use MSE.
    "mse_authors": Divergence("mse_authors", mse_authors, on_probabilities=False, distance_fn=mse),
    "kl": Divergence("kl", kl, on_probabilities=True, distance_fn=kl),
}


def custom_name(fn: Callable) -> str:
    return CUSTOM + getattr(fn, "__name__", type(fn).__name__)


def is_custom(name: str) -> bool:
    return name.startswith(CUSTOM)


def _not_saved(kind: str, name: str) -> str:
    """The error for a config naming a user callable, which is recorded by name only."""
    fn = name.removeprefix(CUSTOM) if name.removeprefix(CUSTOM).isidentifier() else "fn"
    return (
        f"the config names {kind} '{name}', a function that is not saved with it: pass the "
        f"callable again, as l3d.load(path, model, {kind}={fn}) or l3d.run(model, data, config, "
        f"{kind}={fn})"
    )


def get_divergence(divergence: str | DivergenceFn | Divergence) -> Divergence:
    """A registered divergence by name, or a user callable (output, reference) -> scalar, whose
    interventions are measured by the callable itself (it should be 0 at equal outputs)."""
    if isinstance(divergence, Divergence):
        return divergence
    if callable(divergence):
        return Divergence(custom_name(divergence), divergence, False, divergence)
    if is_custom(divergence):
        raise L3DError(_not_saved("divergence", divergence))
    return lookup(DIVERGENCES, divergence, "divergence")


# References ------------------------------------------------------------------------------------


def random_other(outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Each sample's reference is another sample of the batch, uniformly, never itself
    (Section 2.2)."""
    n = outputs.shape[0]
    shift = torch.randint(1, n, (n,), generator=generator)
    return outputs[(torch.arange(n) + shift) % n]


def batch_mean(divergence: Divergence) -> ReferenceFn:
    """The batch-mean output (mean probabilities, returned as their log, for probabilities)."""

    def reference(outputs: Tensor, generator: torch.Generator) -> Tensor:
        if divergence.on_probabilities:
            return F.softmax(outputs, dim=-1).mean(0).log().expand_as(outputs)
        return outputs.mean(0).expand_as(outputs)

    return reference


def uniform(divergence: Divergence) -> ReferenceFn:
    """A uniform output: the uniform distribution for probabilities, else a constant at the
    batch's mean value."""

    def reference(outputs: Tensor, generator: torch.Generator) -> Tensor:
        if divergence.on_probabilities:
            return torch.zeros_like(outputs)
        return torch.full_like(outputs, outputs.mean().item())

    return reference


@dataclass(frozen=True)
class Reference:
    """A reference strategy: `fn(outputs (n, n_out), generator)` gives one reference per sample."""

    name: str
    fn: ReferenceFn

    def __call__(self, outputs: Tensor, generator: torch.Generator) -> Tensor:
        return self.fn(outputs, generator)

    def draw(self, outputs: Tensor, rows: SampleRows, generator: torch.Generator) -> Tensor:
        """Detached reference outputs shaped like a batch's `outputs`, chosen among the batch's
        samples (per token: among all valid positions of the batch, as the authors' LM code does);
        entries that are no sample keep their own output (they are never used)."""
        flat = rows.rows(outputs).flatten(1) if rows.per_token else outputs.flatten(1)
        if flat.shape[0] < 2:
            raise L3DError(
                f"a batch has {flat.shape[0]} sample(s); L3D needs at least 2 so that each "
                "sample's reference can be another sample"
            )
        refs = self.fn(flat, generator)
        if not isinstance(refs, Tensor) or refs.shape != flat.shape:
            got = tuple(refs.shape) if isinstance(refs, Tensor) else type(refs).__name__
            raise L3DError(
                f"the reference function returned {got}; it must return one reference per "
                f"sample, shaped like its input {tuple(flat.shape)}"
            )
        return rows.fill(refs.detach(), outputs.detach())


def counterpart(divergence: Divergence) -> ReferenceFn:
    """Contrastive pairs (Section 4.2): each sample's reference is its counterpart's output,
    given with the data (`l3d.pairs`), never drawn from the batch."""

    def reference(outputs: Tensor, generator: torch.Generator) -> Tensor:
        raise L3DError(
            "this decomposition's references are the outputs of each input's counterpart "
            "(contrastive pairs): use l3d.pairs.pair_coefficients(decomposition, inputs, "
            "counterparts), or pass references= explicitly"
        )

    return reference


ZERO_INPUT = "zero_input"


def zero_input(divergence: Divergence) -> ReferenceFn:
    """The model's output at the all-zero input, the same reference for every sample: each
    gradient then measures a sample against "nothing present", as the one-hot probe does. Where
    inputs are sparse features, a single-feature sample's gradient points along that feature's
    circuit alone; against another sample's or the batch's mean output it also carries the
    reference's offset. The gradient source binds the output (`bind_zero_input`): it needs
    the model, which a reference strategy never sees."""

    def reference(outputs: Tensor, generator: torch.Generator) -> Tensor:
        raise L3DError(
            "reference 'zero_input' needs the model's output at an all-zero input: pass the "
            "references explicitly, or draw them through the decomposition's gradient source"
        )

    return reference


def bind_zero_input(baseline: Tensor) -> Reference:
    """'zero_input' with its output known: `baseline` (1, n_out), one model output."""
    return Reference(ZERO_INPUT, lambda outputs, generator: baseline.expand_as(outputs))


REFERENCES: dict[str, Callable[[Divergence], ReferenceFn]] = {
    "random": lambda divergence: random_other,
    "mean": batch_mean,
    "uniform": uniform,
    "counterpart": counterpart,
    ZERO_INPUT: zero_input,
}


def get_reference(reference: str | ReferenceFn | Reference, divergence: Divergence) -> Reference:
    """A registered strategy by name (shaped by the divergence) or a user callable."""
    if isinstance(reference, Reference):
        return reference
    if callable(reference):
        return Reference(custom_name(reference), reference)
    if is_custom(reference):
        raise L3DError(_not_saved("reference", reference))
    strategy = lookup(REFERENCES, reference, "reference")
    return Reference(reference, strategy(divergence))


def check_references(references: Tensor, outputs: Tensor) -> Tensor:
    """Given references, detached, or an L3DError when they are not one per output."""
    if references.shape != outputs.shape:
        raise L3DError(
            f"references have shape {tuple(references.shape)}, but the model's outputs for "
            f"these inputs have shape {tuple(outputs.shape)}: pass one reference output per sample"
        )
    return references.detach()
