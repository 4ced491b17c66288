"""Per-sample divergence gradients g_i = grad_W D(f(x_i, W), y_ref) at the frozen weights W0 (eq. 2).

Two exact ways to get them, both O(batch) work (the authors' code uses an O(batch^2) batch-jacobian):

- 'vmap': torch.func per-sample gradients, vmap(grad(D o f)), chunked; per-token samples take a
  jacrev over the sequence's token divergences. Works for any model; the test oracle.
- 'jacobian': W0 is frozen, so each sample's output Jacobian J_i = df(x_i)/dW is fixed. Cache it
  once and form g_i = J_i^T dD/dy(y_i, y_ref) by the chain rule for any divergence and any
  reference (design/math.md section 6). For small models this makes an epoch a few matrix products.

Both hand the trainer a `GradientBatch`, which only has to project gradients onto subnetworks and
report their squared norms; a structured fast path can provide the same without dense gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

from l3d.divergences import Divergence, ReferenceFn, check_divergence
from l3d.errors import L3DError
from l3d.model import Dataset, Inputs, Target, batch_size_of, take, to_device, token_mask
from l3d.subnetworks import Subnetworks

# Budget for the cached output Jacobians of the 'jacobian' method under gradient_method='auto'.
JACOBIAN_CACHE_BYTES = 1 << 30


class GradientBatch(Protocol):
    """What the training step needs from one batch of per-sample gradients."""

    n_samples: int

    def project(self, subnetworks: Subnetworks) -> Tensor:
        """<V_k, g_i> for every sample and subnetwork, (n_samples, n_v), differentiable in V."""
        ...

    def sq_norms(self) -> Tensor:
        """||g_i||^2, (n_samples,)."""
        ...


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
                _check_finite(g, name)

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
            self._sq_norms = sum(g.flatten(1).pow(2).sum(1) for g in self.grads.values())
        return self._sq_norms


@dataclass
class ChunkedGradients:
    """One batch whose gradient signals are computed one sample chunk at a time, so that only one
    chunk's activations and signals are in memory (`L3DConfig.chunk_size` on the structured path).

    parts[j]() recomputes chunk j's GradientBatch (its forward and backward) every time it is
    called: a training step takes two passes over the chunks (algorithm.chunked_step).
    """

    parts: list[Callable[[], GradientBatch]]
    n_samples: int

    def chunks(self) -> Iterator[GradientBatch]:
        for part in self.parts:
            yield part()

    def project(self, subnetworks: Subnetworks) -> Tensor:
        return torch.cat([chunk.project(subnetworks) for chunk in self.chunks()])

    def sq_norms(self) -> Tensor:
        return torch.cat([chunk.sq_norms() for chunk in self.chunks()])


def _describe_inputs(inputs: Inputs) -> str:
    """'tensor float32 (2, 5)' or 'dict {input_ids: int64 (2, 16), ...}'."""

    def one(t: Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"

    if isinstance(inputs, Tensor):
        return f"tensor {one(inputs)}"
    return "dict {" + ", ".join(f"{k}: {one(v)}" for k, v in inputs.items()) + "}"


def _check_finite(g: Tensor, name: str) -> None:
    if not torch.isfinite(g).all():
        raise L3DError(
            f"per-sample gradients of '{name}' contain NaN/inf: the model or divergence is "
            "not finite at W0 on this batch (check inputs, logits and log-probabilities)"
        )


def _unsqueeze(x: Inputs) -> Inputs:
    return x.unsqueeze(0) if isinstance(x, Tensor) else {k: v.unsqueeze(0) for k, v in x.items()}


def per_sample_gradients(
    target: Target,
    inputs: Inputs,
    references: Tensor,
    divergence: Divergence,
    *,
    per_token: bool = False,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients by torch.func: {name: (n_samples, *shape)}.

    inputs: a batch (n, ...); references: reference outputs shaped like the model's outputs
    (n, *out) detached. With per_token, outputs are (n, seq, vocab), every position is a sample, and
    positions masked out by inputs['attention_mask'] are dropped: (n_valid_tokens, *shape).
    """
    references = references.detach()

    def sample_output(params: dict[str, Tensor], x: Inputs) -> Tensor:
        return target.forward(_unsqueeze(x), params)[0]

    if per_token:

        def token_divergences(params, x, y_ref):  # (seq,)
            return vmap(divergence)(sample_output(params, x), y_ref)

        fn = jacrev(token_divergences)
    else:

        def sample_divergence(params, x, y_ref):
            return divergence(sample_output(params, x), y_ref)

        fn = grad(sample_divergence)
    grads = vmap(fn, in_dims=(None, 0, 0), chunk_size=chunk_size)(target.w0, inputs, references)
    if per_token:
        mask = token_mask(inputs)
        if mask is None:
            grads = {n: g.flatten(0, 1) for n, g in grads.items()}
        else:
            grads = {n: g[mask] for n, g in grads.items()}
    return grads


def sample_outputs(outputs: Tensor, mask: Tensor | None, per_token: bool) -> Tensor:
    """Model outputs as one row per sample: (n_samples, n_out)."""
    if not per_token:
        return outputs.flatten(1)
    return outputs[mask] if mask is not None else outputs.flatten(0, 1)


def draw_references(
    outputs: Tensor,
    mask: Tensor | None,
    per_token: bool,
    reference: ReferenceFn,
    generator: torch.Generator,
) -> Tensor:
    """Detached reference outputs shaped like `outputs`, chosen among the batch's samples
    (for per_token: among all valid positions in the batch, as the authors' LM code does)."""
    flat = sample_outputs(outputs, mask, per_token)
    if flat.shape[0] < 2:
        raise L3DError(
            f"a batch has {flat.shape[0]} sample(s); L3D needs at least 2 so that each sample's "
            "reference can be another sample"
        )
    refs = reference(flat, generator)
    if not isinstance(refs, Tensor) or refs.shape != flat.shape:
        got = tuple(refs.shape) if isinstance(refs, Tensor) else type(refs).__name__
        raise L3DError(
            f"the reference function returned {got}; it must return one reference per sample, "
            f"shaped like its input {tuple(flat.shape)}"
        )
    refs = refs.detach()
    if not per_token:
        return refs.reshape(outputs.shape)
    full = outputs.detach().clone()  # masked positions keep their own output; they are dropped.
    if mask is not None:
        full[mask] = refs
    else:
        full = refs.reshape(outputs.shape)
    return full


class GradientSource:
    """Yields a GradientBatch per data batch with freshly drawn references (Algorithm 1, lines 3-6)."""

    def __init__(
        self,
        target: Target,
        dataset: Dataset,
        divergence: Divergence,
        reference: ReferenceFn,
        *,
        per_token: bool,
        method: Literal["auto", "jacobian", "vmap", "structured"],
        chunk_size: int | None,
        sequence_chunk_size: int | None = None,
    ) -> None:
        self.target, self.dataset = target, dataset
        self.divergence, self.reference = divergence, reference
        self.per_token, self.chunk_size = per_token, chunk_size
        self.sequence_chunk_size = sequence_chunk_size
        self._validate()
        self.plan = None  # structured.StructuredPlan when method == 'structured'
        self.method = self._choose(method)
        self._jacobian: Tensor | None = None
        self._outputs: Tensor | None = None

    def _first_batch(self) -> Inputs:
        batch = next(iter(self.dataset.batches(None, shuffle=False)), None)
        if batch is None:
            raise L3DError("data yielded no batch with at least 2 samples")
        return batch

    def _validate(self) -> None:
        batch = to_device(take(self._first_batch(), slice(0, 2)), self.dataset.device)
        try:
            outputs = self.target.outputs(batch)
        except L3DError:
            raise  # already names the problem (e.g. an unsupported output type)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            # A data/model mismatch (feature count, dtype, missing key) surfaces as torch's error
            # deep inside the model; name the inputs so the user can see which side is wrong.
            raise L3DError(
                f"the model fails on the data's first samples ({_describe_inputs(batch)}): "
                f"{str(err).splitlines()[0]}. Check that the data matches the model's input "
                "(feature count, dtype, dict keys)"
            ) from err
        if self.per_token and outputs.dim() != 3:
            raise L3DError(
                f"per_token=True needs outputs shaped (batch, seq, vocab); the model returned "
                f"{tuple(outputs.shape)}"
            )
        sample = outputs[0, 0] if self.per_token else outputs[0]
        other = outputs[1, 0] if self.per_token else outputs[1]
        check_divergence(self.divergence, sample, other)

    def _choose(self, method: str) -> str:
        cacheable = self.dataset.inputs is not None and not self.per_token
        if method == "jacobian" and not cacheable:
            raise L3DError(
                "gradient_method='jacobian' needs the data as one tensor (or dict of tensors) and "
                "per_token=False; use 'vmap' or 'auto'"
            )
        if method == "auto" and cacheable:
            n = self.dataset.n_samples
            first = to_device(take(self.dataset.inputs, slice(0, 1)), self.dataset.device)
            n_out = self.target.outputs(first)[0].numel()
            n_w = sum(w.numel() for w in self.target.w0.values())
            if 4 * n * n_out * n_w <= JACOBIAN_CACHE_BYTES:
                return "jacobian"
        if method in ("auto", "structured"):
            from l3d.structured import StructuredPlan

            plan = StructuredPlan.create(self.target)
            # 'auto' takes the structured path when at least one tensor can use it; the rest
            # of the tensors fall back to torch.func inside it.
            if method == "structured" or plan.sites:
                self.plan = plan
                return "structured"
            return "vmap"
        return method

    def _build_cache(self) -> None:
        inputs = self.dataset.inputs

        def sample_output(params, x):
            return self.target.forward(_unsqueeze(x), params)[0]

        jac = vmap(jacrev(sample_output), in_dims=(None, 0), chunk_size=self.chunk_size or 256)
        inputs = to_device(inputs, self.dataset.device)
        jacobians = jac(self.target.w0, inputs)
        self._outputs = self.target.outputs(inputs)
        for name, j in jacobians.items():
            if not torch.isfinite(j).all():
                raise L3DError(f"output Jacobians of '{name}' contain NaN/inf at W0")
        n, n_out = self._outputs.shape[0], self._outputs[0].numel()
        # One (n, n_out, n_w) array, tensors concatenated in target order as DenseGradients.flat.
        self._jacobian = torch.cat([j.reshape(n, n_out, -1) for j in jacobians.values()], dim=2)

    def epoch(self, generator: torch.Generator, shuffle: bool = True) -> Iterator[GradientBatch]:
        if self.method == "jacobian":
            if self._jacobian is None:
                self._build_cache()
            yield from self._epoch_from_cache(generator, shuffle)
            return
        for inputs in self.dataset.batches(generator, shuffle):
            yield self.batch(inputs, generator=generator)

    def _epoch_from_cache(
        self, generator: torch.Generator, shuffle: bool
    ) -> Iterator[DenseGradients]:
        """The whole epoch's gradients in one pass: references are drawn batch by batch (the same
        random stream as drawing them lazily), then g = J^T dD/dy is one product for all samples,
        so a training step only slices its rows."""
        n = self.dataset.n_samples
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        bs = self.dataset.batch_size
        batches = [order[s : s + bs] for s in range(0, n, bs) if len(order[s : s + bs]) >= 2]
        index = torch.cat(batches).to(self.dataset.device)
        outputs = self._outputs[index]  # (n_used, *out)
        refs = torch.cat(
            [
                draw_references(outputs[s : s + len(b)], None, False, self.reference, generator)
                for s, b in zip(range(0, n, bs), batches)
            ]
        )
        dd_dy = vmap(grad(self.divergence))(outputs, refs).flatten(1)  # (n_used, n_out)
        # Contract in dataset order (no copy of the Jacobians), then gather the rows in batch order.
        dd_dy_data = dd_dy.new_zeros(n, dd_dy.shape[1]).index_copy_(0, index, dd_dy)
        flat = torch.einsum("so,sow->sw", dd_dy_data, self._jacobian)[index]  # (n_used, n_w)
        _check_finite(flat, "the decomposed tensors")
        for s, b in zip(range(0, n, bs), batches):
            yield DenseGradients.from_flat(
                flat[s : s + len(b)], self.target.shapes, check_finite=False
            )

    def batch(
        self,
        inputs: Inputs,
        references: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> GradientBatch:
        """Gradients for an explicit batch; references default to the configured strategy."""
        if self.method == "structured":
            return self._structured(inputs, references, generator)
        outputs = self.target.outputs(inputs)
        if references is None:
            generator = generator or torch.Generator().manual_seed(0)
            mask = token_mask(inputs) if self.per_token else None
            references = draw_references(outputs, mask, self.per_token, self.reference, generator)
        elif references.shape != outputs.shape:
            raise L3DError(
                f"references have shape {tuple(references.shape)}, but the model's outputs for "
                f"these inputs have shape {tuple(outputs.shape)}: pass one reference output per sample"
            )
        grads = per_sample_gradients(
            self.target,
            inputs,
            references,
            self.divergence,
            per_token=self.per_token,
            chunk_size=self.chunk_size,
        )
        return DenseGradients(grads)

    def _structured(
        self, inputs: Inputs, references: Tensor | None, generator: torch.Generator | None
    ) -> GradientBatch:
        from l3d.structured import structured_gradients

        if references is None:
            generator = generator or torch.Generator().manual_seed(0)
            mask = token_mask(inputs) if self.per_token else None

            def references(outputs: Tensor) -> Tensor:
                return draw_references(outputs, mask, self.per_token, self.reference, generator)

        def signals(x: Inputs, refs: Tensor | Callable[[Tensor], Tensor]) -> GradientBatch:
            return structured_gradients(
                self.target,
                x,
                refs,
                self.divergence,
                plan=self.plan,
                per_token=self.per_token,
                chunk_size=self.chunk_size,
            )

        n = batch_size_of(inputs)
        # Per-token samples are chunked by whole sequences: token t's gradient needs positions <= t.
        step = self.sequence_chunk_size if self.per_token else self.chunk_size
        if step is None or n <= step:
            return signals(inputs, references)
        # Sample chunks: references are drawn once for the whole batch (from a forward without
        # graph; per-token references come from any valid position of any sequence), so every
        # chunk, in either pass of the step, sees the same ones.
        if callable(references):
            references = references(self.target.outputs(inputs))
        parts = [
            functools.partial(signals, take(inputs, slice(i, i + step)), references[i : i + step])
            for i in range(0, n, step)
        ]
        n_samples = int(token_mask(inputs).sum()) if self.per_token else n
        return ChunkedGradients(parts, n_samples)
