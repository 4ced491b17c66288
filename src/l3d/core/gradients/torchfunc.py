"""The generic backend: per-sample gradients by torch.func, vmap(grad(D o f)), chunked.

Works for any model and any tensor; the test oracle for the other backends. Per-token samples take
a jacrev over the sequence's token divergences.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from l3d.core.divergences import DivergenceFn
from l3d.core.gradients.batch import sample_index, to_rows
from l3d.core.model import Target
from l3d.core.samples import Inputs, SampleRows
from l3d.errors import L3DError


def unsqueeze(x: Inputs) -> Inputs:
    """One sample as a batch of one."""
    return x.unsqueeze(0) if isinstance(x, Tensor) else {k: v.unsqueeze(0) for k, v in x.items()}


@contextmanager
def per_sample_calls(target: Target, jacobians: bool = False) -> Iterator[None]:
    """Where torch.func's vmap runs the model's forward per sample (the 'vmap' and 'jacobian'
    paths, the structured path's generic tensors): a failure there becomes one line. The
    data's forward has passed without vmap (`GradientSource._validate`), so what fails here is
    an operation vmap cannot batch. jacobians: the Jacobian cache's vmap of jacrev (some
    backwards, PReLU's, batch under grad but not under jacrev)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise _unbatchable(target, err, jacobians) from None


def _unbatchable(target: Target, err: RuntimeError, jacobians: bool = False) -> L3DError:
    """The line naming the tensors vmap ran for, the layer that failed (the innermost module
    in the traceback) and, for the causes met, why and what to do."""
    model, first = target.model, (str(err).splitlines() or [type(err).__name__])[0]
    names = {id(m): (n, m) for n, m in model.named_modules() if n}
    layer: tuple[str, nn.Module] | None = None
    frame = err.__traceback__
    while frame is not None:  # innermost last
        layer = names.get(id(frame.tb_frame.f_locals.get("self")), layer)
        frame = frame.tb_next
    where = f" in '{layer[0]}' ({type(layer[1]).__name__})" if layer else ""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    structured = (
        "decompose only tensors of supported layers (Linear, Conv, Embedding, norms) with "
        "gradient_method='structured', which runs no vmap for them (docs/performance.md)"
    )
    if layer and isinstance(layer[1], nn.Embedding) and layer[1].max_norm is not None:
        cause = (
            f"'{layer[0]}' has max_norm={layer[1].max_norm}, which renormalises its weight in "
            f"place during forward; decompose it without (renormalise its rows once, then set "
            f"{layer[0]}.max_norm = None)"
        )
    elif first.startswith("vmap:") and ".item()" in first:
        cause = (
            # transformers' sdpa attention does, for its causal-mask shortcut; eager does not
            f"the model uses {attention} attention, whose forward calls .item(): load it with "
            "attn_implementation='eager' (l3d.hf.load_causal_lm does)"
            if attention not in (None, "eager")
            else "its forward branches on tensor values or calls .item(): write it without, or "
            f"{structured}"
        )
    elif jacobians:
        cause = (
            "an operation of its forward or backward has no batched Jacobian (jacrev) form; use "
            "gradient_method='vmap' or 'structured' ('auto' chooses between them)"
        )
    else:
        cause = f"an operation of its forward has no per-sample (vmap) form; {structured}"
    tensors = ", ".join(target.names)
    how = "vmap of jacrev (the Jacobian cache)" if jacobians else "vmap"
    return L3DError(
        f"torch.func's {how} cannot run the model per sample for {tensors}{where} "
        f"({first[:90]}...): {cause}"
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
    with per_sample_calls(target):
        grads = vmap(fn, in_dims=(None, 0, 0), chunk_size=chunk_size)(target.w0, inputs, references)
    rows = SampleRows.of(inputs, per_token)
    index, _ = sample_index(rows, len(references))
    return {n: to_rows(g, rows, index) for n, g in grads.items()}
