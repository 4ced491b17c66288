"""The generic backend: per-sample gradients by torch.func, vmap(grad(D o f)), chunked.

Works for any model and any tensor; the test oracle for the other backends. Per-token samples take
a jacrev over the sequence's token divergences. Where vmap cannot batch an operation of the
model (nn.GRU, nn.RNN, a forward calling .item()), the same transforms run one sample at a time
(`PerSample`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from l3d.core.divergences import DivergenceFn
from l3d.core.gradients.batch import sample_index, to_rows
from l3d.core.model import Target
from l3d.core.samples import Inputs, SampleRows, batch_size_of, take
from l3d.errors import L3DError

logger = logging.getLogger(__name__)


class Unbatchable(L3DError):
    """torch.func's vmap cannot run the model per sample. `layer`: where it failed ("'rnn'
    (GRU)", or ""); `loopable`: whether running one sample at a time can (not for an Embedding
    with max_norm, whose renormalisation writes into the weights); `advice`: how to let vmap
    run it, where known."""

    def __init__(self, message: str, layer: str, loopable: bool, advice: str = "") -> None:
        super().__init__(message)
        self.layer, self.loopable, self.advice = layer, loopable, advice

    @property
    def what(self) -> str:
        """The failure in a few words, for the warning and the gradient paths."""
        return f"vmap cannot batch {self.layer or 'an operation of the model'}"


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


def _unbatchable(target: Target, err: RuntimeError, jacobians: bool = False) -> Unbatchable:
    """The line naming the tensors vmap ran for, the layer that failed (the innermost module
    in the traceback) and, for the causes met, why and what to do."""
    model, first = target.model, (str(err).splitlines() or [type(err).__name__])[0]
    names = {id(m): (n, m) for n, m in model.named_modules() if n}
    layer: tuple[str, nn.Module] | None = None
    frame = err.__traceback__
    while frame is not None:  # innermost last
        layer = names.get(id(frame.tb_frame.f_locals.get("self")), layer)
        frame = frame.tb_next
    named = f"'{layer[0]}' ({type(layer[1]).__name__})" if layer else ""
    where = f" in {named}" if layer else ""
    module = layer[1] if layer else None
    renormalises = isinstance(module, nn.Embedding) and module.max_norm is not None
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    structured = (
        "decompose only tensors of supported layers (Linear, Conv, Embedding, norms) with "
        "gradient_method='structured', which runs no vmap for them (docs/performance.md)"
    )
    if layer and isinstance(module, nn.Embedding) and renormalises:
        cause = (
            f"'{layer[0]}' has max_norm={module.max_norm}, which renormalises its weight in "
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
    sdpa = first.startswith("vmap:") and ".item()" in first and attention not in (None, "eager")
    return Unbatchable(
        f"torch.func's {how} cannot run the model per sample for {tensors}{where} "
        f"({first[:90]}...): {cause}",
        named,
        loopable=not renormalises,
        advice="load it with attn_implementation='eager' (l3d.hf.load_causal_lm does), which "
        "vmap batches"
        if sdpa
        else "",
    )


def per_sample_gradients(
    target: Target,
    inputs: Inputs,
    references: Tensor,
    divergence: DivergenceFn,
    *,
    per_token: bool = False,
    chunk_size: int | None = None,
    loop: bool = False,
) -> dict[str, Tensor]:
    """Per-sample gradients by torch.func: {name: (n_samples, *shape)}.

    inputs: a batch (n, ...); references: reference outputs shaped like the model's outputs
    (n, *out) detached. With per_token, outputs are (n, seq, vocab), every position is a sample, and
    positions that are no sample (SampleRows) are dropped: (n_valid_tokens, *shape).
    loop: run the samples one at a time instead of by vmap (and the tokens' Jacobian row by row),
    for a model vmap cannot batch (`PerSample`).
    """
    references = references.detach()

    def sample_output(params: dict[str, Tensor], x: Inputs) -> Tensor:
        return target.forward(unsqueeze(x), params)[0]

    if per_token:

        def token_divergences(params, x, y_ref):  # (seq,)
            return vmap(divergence)(sample_output(params, x), y_ref)

        fn = jacrev(token_divergences, chunk_size=1 if loop else None)
    else:

        def sample_divergence(params, x, y_ref):
            return divergence(sample_output(params, x), y_ref)

        fn = grad(sample_divergence)
    if loop:
        parts = [
            fn(target.w0, take(inputs, i), references[i]) for i in range(batch_size_of(inputs))
        ]
        grads = {name: torch.stack([p[name] for p in parts]) for name in target.names}
    else:
        with per_sample_calls(target):
            batched = vmap(fn, in_dims=(None, 0, 0), chunk_size=chunk_size)
            grads = batched(target.w0, inputs, references)
    rows = SampleRows.of(inputs, per_token)
    index, _ = sample_index(rows, len(references))
    return {n: to_rows(g, rows, index) for n, g in grads.items()}


@dataclass
class PerSample:
    """How the generic path runs the model per sample: by vmap, until vmap fails on an operation
    a loop over samples can run (nn.GRU and nn.RNN write into their unbatched initial state); then
    one sample at a time, said once as a warning, from that batch on. A GradientSource holds one
    for its whole life, so vmap fails at most once."""

    loop: bool = False
    reason: str = ""
    """Why vmap is not used, once it failed."""

    def gradients(
        self,
        target: Target,
        inputs: Inputs,
        references: Tensor,
        divergence: DivergenceFn,
        *,
        per_token: bool = False,
        chunk_size: int | None = None,
    ) -> dict[str, Tensor]:
        """`per_sample_gradients`, by vmap or one sample at a time."""
        if not self.loop:
            try:
                return per_sample_gradients(
                    target, inputs, references, divergence, per_token=per_token,
                    chunk_size=chunk_size,
                )  # fmt: skip
            except Unbatchable as err:
                if not err.loopable:
                    raise
                self.loop, self.reason = True, err.what
                logger.warning(
                    "%s: the gradients of %s are taken one sample at a time instead (slower)%s",
                    err.what,
                    ", ".join(target.names),
                    f"; {err.advice}" if err.advice else "",
                )
        return per_sample_gradients(
            target, inputs, references, divergence, per_token=per_token, loop=True
        )
