"""Per-sample divergence gradients g_i = grad_W D(f(x_i, W), y_ref) at the frozen weights W0
(eq. 2), one `GradientBatch` per data batch with freshly drawn references (Algorithm 1, lines 3-6).

Three exact backends, all O(batch) work (the authors' code uses an O(batch^2) batch-jacobian),
chosen once through `Method`:
- torchfunc ('vmap'): vmap(grad(D o f)) for any model and tensor; the test oracle.
- jacobian: each sample's output Jacobian cached at W0, g_i = J_i^T dD/dy (small models).
- structured: weight gradients kept factored as layer inputs and output-gradients.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from l3d.core.distributed import Group, fingerprint
from l3d.core.divergences import (
    ZERO_INPUT,
    Divergence,
    DivergenceFn,
    Reference,
    ReferenceFn,
    bind_zero_input,
    check_references,
    get_divergence,
    get_reference,
)
from l3d.core.gradients.batch import ChunkedGradients, DenseGradients, GradientBatch
from l3d.core.gradients.jacobian import JacobianCache, cache_bytes, sample_jacobians
from l3d.core.gradients.structured import Projection, StructuredPlan, structured_gradients
from l3d.core.gradients.torchfunc import PerSample
from l3d.core.model import Target, check_independent_samples, check_token_ids
from l3d.core.samples import (
    Dataset,
    Inputs,
    SampleRows,
    batch_size_of,
    model_failure,
    take,
    to_device,
)
from l3d.errors import L3DError

# Budget for the cached output Jacobians of the 'jacobian' method under gradient_method='auto'.
JACOBIAN_CACHE_BYTES = 1 << 30
# Under 'auto', the cache also needs at most this many outputs per sample: building it costs one
# backward pass per output element per sample (jacrev), so its cost grows with n_out where the
# other paths' do not (a tiny causal LM's 16 x 100 logits per sequence: 5 s against 0.02 s for
# one epoch). Every toy of the paper (at most 100 outputs) stays on it.
JACOBIAN_MAX_OUTPUTS = 128


class Method(str, enum.Enum):
    """L3DConfig.gradient_method (compares equal to its string)."""

    AUTO = "auto"
    JACOBIAN = "jacobian"
    VMAP = "vmap"
    STRUCTURED = "structured"


# A batch's references: given, or drawn from the outputs of the batch's own forward.
References = Tensor | Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class BatchMemory:
    """Bytes one training batch takes, beyond the model and the subnetworks' training state."""

    activations: int
    """What forming the gradients holds besides them: the forward's saved activations, the
    outputs, references and the divergence's buffers."""
    gradients: int
    """The per-sample gradients, or the signals they stay factored as."""
    kept: int
    """What the projections onto V_in and V_out keep for the step's backward."""
    samples: int
    """Samples (rows g_i) of the batch."""
    dense: bool
    """Whether the gradients are materialised (n_samples, n_w)."""


class GradientSource:
    """Per-sample gradients of one target under one divergence and reference strategy.

    dataset: the data that `epoch` iterates over (training, evaluation); None for a source that
    only answers `batch` (coefficients and impact of given inputs). `example`: inputs to validate
    model, data and divergence on when there is no dataset. Validation runs once, here.
    `projection`: the subnetworks the gradients are for (count and ranks), on the structured
    path: gradients cheaper to project formed than factored are formed as each layer's signal is
    made (`structured.Projection`), not after all are.
    """

    def __init__(
        self,
        target: Target,
        divergence: Divergence | DivergenceFn | str,
        reference: Reference | ReferenceFn | str,
        *,
        per_token: bool,
        method: str | Method = Method.AUTO,
        chunk_size: int | None = None,
        sequence_chunk_size: int | None = None,
        dataset: Dataset | None = None,
        example: Inputs | None = None,
        progress: bool = True,
        projection: Projection | None = None,
    ) -> None:
        check_independent_samples(target.model)
        self.projection = projection
        self.per_sample = PerSample()
        self.target, self.dataset = target, dataset
        self.progress = progress
        self.divergence = get_divergence(divergence)
        self.reference = get_reference(reference, self.divergence)
        self.per_token, self.chunk_size = per_token, chunk_size
        self.sequence_chunk_size = sequence_chunk_size
        if example is None:
            if dataset is None:
                raise ValueError("a GradientSource needs a dataset or example inputs")
            example = self._first_batch(dataset)
        self._checked: set[tuple] = set()
        self.check(example)
        if self.reference.name == ZERO_INPUT:
            self.reference = self._zero_input(example)
        # Two inputs, copied (not a view of the data's storage), for `batch_memory`.
        self._example = take(example, torch.arange(min(2, batch_size_of(example))))
        self.plan: StructuredPlan | None = None
        self._cache: JacobianCache | None = None
        self.method = self._choose(Method(method), example)

    @staticmethod
    def _first_batch(dataset: Dataset) -> Inputs:
        batch = next(iter(dataset.batches(None, shuffle=False)), None)
        if batch is None:
            raise L3DError("data yielded no batch with at least 2 samples")
        return batch

    def _zero_input(self, example: Inputs) -> Reference:
        """The 'zero_input' reference bound to this model's output at an all-zero input."""
        if self.per_token or not isinstance(example, Tensor) or not example.is_floating_point():
            raise L3DError(
                "reference='zero_input' compares each sample with the model's output at an "
                "all-zero input, which needs float tensor inputs and no per-token samples: use "
                "reference='random' or 'mean'"
            )
        device = next(iter(self.target.w0.values())).device
        with torch.no_grad():
            baseline = self.target.outputs(torch.zeros_like(example[:1], device=device))
        return bind_zero_input(baseline.flatten(1))

    def check(self, inputs: Inputs) -> None:
        """`_validate` inputs of a kind (per-row shape, dtype, keys) not seen before: later calls
        on data of the same kind run no extra forward. Token ids are checked every time (a
        test forward reads two rows; an id past the vocabulary may sit in any)."""
        check_token_ids(self.target.model, inputs, "the data")
        kind = _kind(inputs)
        if kind not in self._checked:
            self._validate(inputs)
            self._checked.add(kind)

    def _validate(self, example: Inputs) -> None:
        """Refuse inputs the model cannot take, outputs without one row per sample, a model
        that is not a function of its inputs, or outputs the divergence cannot read, in one line
        (two forwards of the first two samples)."""
        device = next(iter(self.target.w0.values())).device
        batch = to_device(take(example, slice(0, 2)), device)
        self._check_precision(batch)
        try:
            # Three runs: dropout on two samples' few outputs can repeat its mask by chance.
            outputs, *again = (self.target.outputs(batch) for _ in range(3))
        except L3DError:
            raise  # already names the problem (e.g. an unsupported output type)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            raise model_failure(err, "the data's", batch) from err
        _check_rows(outputs, batch_size_of(batch))
        self._check_precision(batch, outputs)
        if not all(torch.allclose(outputs, o, rtol=1e-4, atol=1e-6, equal_nan=True) for o in again):
            # g_i must be a function of x_i and W0 (vmap refuses random ops with a traceback;
            # the other backends would decompose noise).
            raise L3DError(
                "the model's outputs differ between two runs on the same inputs: it draws random "
                "numbers in forward (dropout called with training=True, added noise?); make "
                "forward deterministic in eval mode"
            )
        if self.per_token and outputs.dim() != 3:
            raise L3DError(
                f"per_token=True needs outputs shaped (batch, seq, vocab); the model returned "
                f"{tuple(outputs.shape)}"
            )
        if not self.per_token and outputs.dim() >= 3 and _token_inputs(batch):
            # One sample per sequence would sum the divergence over positions, padding included.
            raise L3DError(
                f"the model returns {tuple(outputs.shape)} for token inputs, a sequence axis: "
                "pass per_token=True, so that each (sequence, position) is one sample and "
                "padding (attention_mask 0) is none"
            )
        self.n_out = outputs[0, 0].numel() if self.per_token else outputs[0].numel()
        one = outputs[0, 0] if self.per_token else outputs[0]
        self._sample_shape = tuple(one.shape)
        if self.divergence.on_probabilities and one.dim() > 1:
            # References ('mean') and intervention distances read a sample's output as one
            # distribution; the divergence would sum one per position of the last axis.
            raise L3DError(
                f"divergence '{self.divergence.name}' reads each sample's output as one "
                f"distribution over its last axis, but each is shaped {tuple(one.shape)}: pass "
                "per_token=True (one sample per position), return (n, classes) outputs, or use "
                "divergence 'mse'"
            )
        # The last input stands in for a reference: one sequence is many per-token samples.
        other = outputs[-1, -1] if self.per_token else outputs[-1]
        self.divergence.check(one, other)

    def _check_precision(self, batch: Inputs, outputs: Tensor | None = None) -> None:
        """L3D computes in float32: other parameter or half-precision data dtypes fail deep in a
        step (e.g. 'BFloat16 != float'), so refuse them here, before the first forward; and,
        given the outputs of one, outputs cast to another dtype."""
        if outputs is not None:
            if outputs.dtype != torch.float32:
                raise L3DError(
                    f"the model returns {_dtype_name(outputs.dtype)} outputs from float32 "
                    "weights: L3D computes in float32; return float32 outputs (drop the cast in "
                    "forward)"
                )
            return
        params = [*self.target.w0.values(), *self.target.frozen.values()]
        odd = next(
            (p.dtype for p in params if p.is_floating_point() and p.dtype != torch.float32), None
        )
        if odd is not None:
            raise L3DError(
                f"model parameters are {_dtype_name(odd)}: L3D computes in float32; call "
                "model.float() before decomposing (and pass float32 data)"
            )
        tensors = [batch] if isinstance(batch, Tensor) else list(batch.values())
        half = next((t.dtype for t in tensors if t.dtype in (torch.float16, torch.bfloat16)), None)
        if half is not None:
            raise L3DError(
                f"data is {_dtype_name(half)}: L3D computes in float32; pass the data as float32 "
                "(data.float())"
            )

    def _choose(self, method: Method, example: Inputs) -> Method:
        cacheable = self.dataset is not None and self.dataset.inputs is not None
        cacheable = cacheable and not self.per_token
        match method:
            case Method.JACOBIAN:
                if not cacheable:
                    raise L3DError(
                        "gradient_method='jacobian' needs the data as one tensor (or dict of "
                        "tensors) and per_token=False; use 'vmap' or 'auto'"
                    )
                return self._use_cache()
            case Method.VMAP:
                return Method.VMAP
            case Method.STRUCTURED:
                self.plan = StructuredPlan.create(self.target)
                return Method.STRUCTURED
            case Method.AUTO:
                if cacheable and self.n_out <= JACOBIAN_MAX_OUTPUTS:
                    assert self.dataset is not None and self.dataset.n_samples is not None
                    need = cache_bytes(self.target, self.dataset.n_samples, self.n_out)
                    if need <= JACOBIAN_CACHE_BYTES and self._cache_runs():
                        return self._use_cache()
                plan = StructuredPlan.create(self.target)
                # The structured path when at least one tensor can use it; the rest of the
                # tensors fall back to torch.func inside it.
                if plan.sites:
                    self.plan = plan
                    return Method.STRUCTURED
                return Method.VMAP

    def batch_memory(
        self, n_subnetworks: int, ranks: dict[str, int], batch_size: int
    ) -> BatchMemory:
        """Memory of one training batch of `batch_size` inputs (of one chunk of it, where the
        structured path takes the batch in chunks), from two inputs scaled linearly: what
        forming their gradients holds besides them (`_activation_bytes`), their gradients or
        signals (`GradientBatch.nbytes`) and what projecting them keeps (`kept_bytes`). Not
        counted: transients of the model's backwards (every layer's output-gradient, which the
        structured path holds until that layer's signal is made; the per-token backward's
        batched copies of the activation gradients)."""
        device = next(iter(self.target.w0.values())).device
        probe = to_device(self._example, device)
        n = batch_size_of(probe)
        step = self.sequence_chunk_size if self.per_token else self.chunk_size
        chunked = self.method is Method.STRUCTURED and step is not None
        inputs = min(batch_size, step) if chunked and step is not None else batch_size
        # The outputs as their own references: any strategy's (a counterpart's output too) are
        # shaped so, and the memory does not depend on their values.
        batch = self.batch(probe, self.target.outputs(probe))
        scale = inputs / n
        return BatchMemory(
            activations=round(scale * self._activation_bytes(probe)),
            gradients=round(scale * batch.nbytes()),
            kept=round(scale * batch.kept_bytes(n_subnetworks, ranks)),
            samples=round(batch.n_samples * batch_size / n),
            dense=isinstance(batch, DenseGradients),
        )

    def _activation_bytes(self, inputs: Inputs) -> int:
        """What forming the gradients holds besides the gradients: the distinct storages the
        forward (decomposed tensors requiring grad) saves for its backward, the model's own
        parameters and buffers excluded; the outputs, references and dD/dy (three output-sized
        tensors); and what the divergence saves, twice (its backward's buffers are as large)."""
        model = self.target.model
        weights = [*self.target.w0.values(), *model.parameters(), *model.buffers()]
        excluded = {w.untyped_storage().data_ptr() for w in weights}

        def saved_by(fn: Callable[[], Tensor]) -> tuple[Tensor, int]:
            saved: dict[int, int] = {}

            def pack(t: Tensor) -> Tensor:
                storage = t.untyped_storage()
                if storage.data_ptr() not in excluded:
                    saved[storage.data_ptr()] = storage.nbytes()
                return t

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                result = fn()
            return result, sum(saved.values())

        params = {n: w.detach().requires_grad_() for n, w in self.target.w0.items()}
        outputs, forward = saved_by(lambda: self.target.forward(inputs, params))
        y = outputs.detach().flatten(0, 1) if self.per_token else outputs.detach()
        _, divergence = saved_by(lambda: vmap(self.divergence.fn)(y.clone().requires_grad_(), y))
        return forward + 3 * outputs.nbytes + 2 * divergence

    def _cache_runs(self) -> bool:
        """Whether torch.func builds the Jacobian cache's vmap of jacrev over the model, on the
        example's rows. The structured path needs vmap only for tensors it does not support:
        a model with nn.GRU, transformers' mask code calling .item(), or nn.PReLU (whose backward
        jacrev cannot batch) still has structured Linear weights; where some tensors need vmap,
        its error names just those."""
        # The example's rows repeated to a count no output axis has: a batching rule that mixes
        # up the batch with an output axis (PReLU's backward) can pass where the sizes are equal.
        size = next((k for k in (3, 5, 7) if k not in self._sample_shape), 11)
        rows = torch.arange(size) % batch_size_of(self._example)
        probe = to_device(take(self._example, rows), next(iter(self.target.w0.values())).device)
        try:
            sample_jacobians(self.target, probe, size)
        except L3DError:
            return False
        return True

    def _use_cache(self) -> Method:
        assert self.dataset is not None
        self._cache = JacobianCache(self.target, self.dataset, self.chunk_size, self.progress)
        return Method.JACOBIAN

    def epoch(
        self, generator: torch.Generator, shuffle: bool = True, group: Group | None = None
    ) -> Iterator[GradientBatch]:
        """One pass over the dataset's batches, each with freshly drawn references. With a
        process group, every rank draws the same batches and yields its shard of each."""
        if self.dataset is None:
            raise ValueError("this GradientSource has no dataset to iterate over")
        if self._cache is not None:
            for whole in self._cache.epoch(self.divergence, self.reference, generator, shuffle):
                if group is None:
                    yield whole
                else:  # every rank holds the cache: its rows of the whole batch's gradients
                    flat = whole.flatten()[group.shard(whole.n_samples)]
                    yield DenseGradients.from_flat(flat, self.target.shapes, check_finite=False)
            return
        for i, (inputs, references) in enumerate(
            self.dataset.referenced_batches(generator, shuffle)
        ):
            if self.dataset.batches_given is not None:
                if i == 0 and group is not None:
                    # Each rank iterates its own: a loader shuffled with another seed per rank
                    # trains on other batches silently. The first batch of every epoch is
                    # compared (one collective per epoch).
                    tensors = [inputs] if isinstance(inputs, Tensor) else list(inputs.values())
                    group.check_same(fingerprint(tensors), "data batches")
                self.check(inputs)  # batches given one by one: a later one may not fit
            if self.per_token and SampleRows.of(inputs, True).count(batch_size_of(inputs)) < (
                1 if references is not None else 2
            ):
                # Sequences of padding only, or pair positions on a few sequences: this batch
                # has no sample (or none other to draw its reference from). Every rank sees
                # the same whole batch, so all skip it together.
                continue
            if group is None:
                yield self.batch(inputs, references, generator)
                continue
            if references is None:
                # Drawn from the whole batch (one forward of it on every rank, no exchange), with
                # the generator every rank shares: the single process's references, sharded.
                with torch.no_grad():
                    outputs = self.target.outputs(inputs)
                rows = SampleRows.of(inputs, self.per_token)
                references = self.reference.draw(outputs, rows, generator)
            mine = group.shard(batch_size_of(inputs))
            shard = take(inputs, mine)
            if SampleRows.of(shard, self.per_token).count(mine.stop - mine.start) == 0:
                yield self._no_samples()
            else:
                yield self.batch(shard, references[mine])

    def _no_samples(self) -> DenseGradients:
        """A shard without samples (a batch smaller than the group, or all padding): the rank
        still takes part in the step's collectives, with (0, n_w) gradients."""
        w = next(iter(self.target.w0.values()))
        n_w = sum(w.numel() for w in self.target.w0.values())
        return DenseGradients.from_flat(w.new_zeros(0, n_w), self.target.shapes)

    def batch(
        self,
        inputs: Inputs,
        references: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> GradientBatch:
        """Gradients for an explicit batch; references default to the configured strategy, drawn
        with `generator` (default: seed 0)."""
        rows = SampleRows.of(inputs, self.per_token)
        refs: References
        if references is None:
            gen = generator or torch.Generator().manual_seed(0)

            def refs(outputs: Tensor) -> Tensor:
                return self.reference.draw(outputs, rows, gen)

        else:
            refs = references
        if self.method is Method.STRUCTURED:
            return self._structured(inputs, refs, rows)
        outputs = self.target.outputs(inputs)
        refs = refs(outputs) if callable(refs) else check_references(refs, outputs)
        grads = self.per_sample.gradients(
            self.target,
            inputs,
            refs,
            self.divergence.fn,
            per_token=self.per_token,
            chunk_size=self.chunk_size,
        )
        return DenseGradients(grads)

    def _structured(self, inputs: Inputs, refs: References, rows: SampleRows) -> GradientBatch:
        assert self.plan is not None
        signals = functools.partial(
            structured_gradients,
            self.target,
            divergence=self.divergence.fn,
            plan=self.plan,
            per_token=self.per_token,
            chunk_size=self.chunk_size,
            projection=self.projection,
        )
        n = batch_size_of(inputs)
        # Per-token samples are chunked by whole sequences: token t's gradient needs positions <= t.
        step = self.sequence_chunk_size if self.per_token else self.chunk_size
        if step is None or n <= step:
            return signals(inputs, refs)
        # Sample chunks: references are drawn once for the whole batch (from a forward without
        # graph; per-token references come from any valid position of any sequence), so every
        # chunk, in either pass of the step, sees the same ones.
        if callable(refs):
            refs = refs(self.target.outputs(inputs))
        parts = [
            functools.partial(signals, take(inputs, slice(i, i + step)), refs[i : i + step])
            for i in range(0, n, step)
        ]
        return ChunkedGradients(parts, rows.count(n))


def _check_rows(outputs: Tensor, n_inputs: int) -> None:
    """Outputs must be batch-first with a feature axis: one row per input."""
    if outputs.dim() == 0:
        raise L3DError(
            "the model returns a single number for a batch (a loss?): L3D needs one output row "
            "per sample, shaped (batch, n_outputs)"
        )
    if outputs.shape[0] != n_inputs:
        raise L3DError(
            f"the model returns {outputs.shape[0]} output rows for {n_inputs} inputs: L3D needs "
            "one output row per sample (batch-first outputs)"
        )
    if outputs.dim() == 1:
        raise L3DError(
            f"the model returns one number per sample, shaped ({n_inputs},): L3D needs a "
            "feature axis; return out.unsqueeze(-1), shaped (batch, 1)"
        )


def _kind(inputs: Inputs) -> tuple:
    """What `GradientSource.check` tells inputs apart by: each tensor's per-row shape and dtype."""
    tensors = {"": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    return tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in sorted(tensors.items()))


def _token_inputs(inputs: Inputs) -> bool:
    """Token ids: an integer tensor, or a dict with input_ids or an attention_mask."""
    if isinstance(inputs, Tensor):
        return not inputs.is_floating_point() and not inputs.is_complex()
    return "input_ids" in inputs or "attention_mask" in inputs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
