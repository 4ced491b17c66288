"""The generic backend: per-sample gradients by torch.func, vmap(grad(D o f)), chunked.

Works for any model and any tensor; the test oracle for the other backends. Per-token samples take
a jacrev over the sequence's token divergences.
"""

from __future__ import annotations

from torch import Tensor
from torch.func import grad, jacrev, vmap

from l3d.core.divergences import DivergenceFn
from l3d.core.gradients.batch import sample_index, to_rows
from l3d.core.model import Target
from l3d.core.samples import Inputs, SampleRows
from l3d.errors import L3DError


def unsqueeze(x: Inputs) -> Inputs:
    """One sample as a batch of one."""
    return x.unsqueeze(0) if isinstance(x, Tensor) else {k: v.unsqueeze(0) for k, v in x.items()}


def _unbatchable(target: Target, err: RuntimeError) -> L3DError:
    """vmap refuses forwards that branch on tensor values or call .item(): transformers' sdpa
    attention does (its causal-mask shortcut); eager attention does not."""
    attention = getattr(getattr(target.model, "config", None), "_attn_implementation", None)
    fix = (
        f"the model uses {attention} attention: load it with attn_implementation='eager' "
        "(l3d.hf.load_causal_lm does)"
        if attention not in (None, "eager")
        else "write forward without them, or decompose only tensors of supported layers "
        "(gradient_method='structured', docs/performance.md)"
    )
    return L3DError(
        f"torch.func's vmap cannot run the model ({str(err).splitlines()[0][:90]}...): its "
        f"forward branches on tensor values or calls .item(); {fix}"
    )


def per_sample_gradients(
    target: Target,
    inputs: Inputs,
    references: Tensor,
    divergence: DivergenceFn,
    *,
    per_token: bool = False,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients by torch.func: {name: (n_samples, *shape)}.

    inputs: a batch (n, ...); references: reference outputs shaped like the model's outputs
    (n, *out) detached. With per_token, outputs are (n, seq, vocab), every position is a sample, and
    positions that are no sample (SampleRows) are dropped: (n_valid_tokens, *shape).
    """
    references = references.detach()

    def sample_output(params: dict[str, Tensor], x: Inputs) -> Tensor:
        return target.forward(unsqueeze(x), params)[0]

    if per_token:

        def token_divergences(params, x, y_ref):  # (seq,)
            return vmap(divergence)(sample_output(params, x), y_ref)

        fn = jacrev(token_divergences)
    else:

        def sample_divergence(params, x, y_ref):
            return divergence(sample_output(params, x), y_ref)

        fn = grad(sample_divergence)
    try:
        grads = vmap(fn, in_dims=(None, 0, 0), chunk_size=chunk_size)(target.w0, inputs, references)
    except RuntimeError as err:
        if not str(err).startswith("vmap:"):
            raise
        raise _unbatchable(target, err) from None
    rows = SampleRows.of(inputs, per_token)
    index, _ = sample_index(rows, len(references))
    return {n: to_rows(g, rows, index) for n, g in grads.items()}
