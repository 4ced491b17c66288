"""The frozen model under decomposition: parameter selection, ranks per tensor, and functional
calls at W0 or at W0 moved along a direction."""

from __future__ import annotations

import difflib
import fnmatch
import math
import numbers
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from l3d.core.samples import SAMPLE_MASK, Inputs
from l3d.errors import L3DError


def select_parameters(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the model's parameters matched by exact names or glob patterns, in model order."""
    patterns = list(patterns)
    if not patterns:
        raise L3DError(
            "no parameter tensors given: pass names or globs, e.g. params=['fc1.weight']"
        )
    names = [n for n, _ in model.named_parameters()]
    selected: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            listing = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
            raise L3DError(
                f"params pattern '{pattern}' matches no parameter of the model.{hint} "
                f"The model's parameters are: {listing}"
            )
        selected += [h for h in hits if h not in selected]
    params = dict(model.named_parameters())
    for name in selected:
        p = params[name]
        if not p.is_floating_point():
            raise L3DError(
                f"parameter '{name}' holds {str(p.dtype).removeprefix('torch.')} values, which "
                "have no gradient: leave it out of params (name the tensors to decompose)"
            )
        if p.dim() == 0:
            raise L3DError(
                f"parameter '{name}' is a single number (0-d): L3D decomposes tensors with at "
                "least one axis; leave it out of params (name the tensors to decompose)"
            )
    return [n for n in names if n in selected]


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters registered in more than one module (tied embeddings): a hook or an
    adapter on one module sees only one of their uses."""
    uses = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return {i for i, n in uses.items() if n > 1}


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def check_token_ids(model: nn.Module, inputs: Inputs, what: str) -> None:
    """Refuse token ids outside the model's vocabulary (its `get_input_embeddings()`, where it
    has one): anywhere in the data, not only in the rows a test forward reads."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    get = getattr(model, "get_input_embeddings", None)
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.numel() == 0 or get is None:
        return
    embedding = get()
    if not isinstance(embedding, nn.Embedding):
        return
    vocabulary = embedding.num_embeddings
    outside = ids[(ids < 0) | (ids >= vocabulary)]
    if outside.numel():
        raise L3DError(
            f"token id {int(outside[0])} in input_ids is outside the model's vocabulary of "
            f"{vocabulary} ({what}): tokenize with the model's own tokenizer"
        )


def check_loaded(model: nn.Module) -> None:
    """Refuse a model whose parameters hold no values (made on the meta device)."""
    if any(p.is_meta for p in model.parameters()):
        raise L3DError(
            "the model's parameters are on the meta device and hold no values (made with "
            "device='meta' or an empty-weights context?): load its weights first"
        )


def check_independent_samples(model: nn.Module) -> None:
    """Refuse a model whose eval-mode forward mixes the samples of a batch: a BatchNorm without
    running statistics (track_running_stats=False) normalises over the batch even in eval
    mode, so a sample's output, and its gradient g_i (eq. 2), depends on the others."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None:
            raise L3DError(
                f"the model's '{name}' ({type(m).__name__}) normalises over the batch even in "
                "eval mode (it keeps no running statistics), so one sample's output depends on "
                "the others and has no per-sample gradient: make it track_running_stats=True "
                "and fit its statistics in train mode, or use a per-sample norm (LayerNorm, "
                "GroupNorm)"
            )


def resolve_device(device: str) -> torch.device:
    """The run's device, refusing one that this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise L3DError(f"unknown device '{device}': use 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise L3DError(f"device '{device}' requested, but CUDA is not available here: use 'cpu'")
    return dev


def resolve_ranks(names: list[str], rank: int | Mapping[str, int]) -> dict[str, int]:
    """Per-tensor rank from an int or a {name or glob: rank} mapping (first matching key wins)."""
    if isinstance(rank, int):
        return {n: rank for n in names}
    ranks = {}
    for n in names:
        match = next(
            (r for key, r in rank.items() if n == key or fnmatch.fnmatchcase(n, key)), None
        )
        if match is None:
            raise L3DError(
                f"rank mapping {dict(rank)} gives no rank for tensor '{n}': add its name or a glob "
                "such as '*' as a default"
            )
        ranks[n] = match
    unused = [k for k in rank if not any(n == k or fnmatch.fnmatchcase(n, k) for n in names)]
    if unused:
        raise L3DError(f"rank keys {unused} match no decomposed tensor; decomposed: {names}")
    return ranks


def output_tensor(output: object) -> Tensor:
    """The model's prediction: a tensor, an object with .logits (HuggingFace), or a tuple's first
    item."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise L3DError(
        f"the model returned {type(output).__name__}; L3D needs a tensor, an object with .logits, "
        "or a tuple whose first item is the output tensor"
    )


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block, each module's own mode restored after. L3D's
    per-sample gradient g_i is a function of x_i and W0 alone (Section 2.2, eq. 2): in train mode
    BatchNorm's batch statistics would make samples interact and move its running statistics,
    and dropout would make g_i random.

    PyTorch's attention fast path is off inside too (the global flag restored after): in eval
    mode without grad, nn.TransformerEncoder(Layer) and nn.MultiheadAttention switch to fused
    kernels and nested tensors, another function (a padded position's output is 0 there, not
    attention over the unmasked keys) that vmap cannot batch. Off, every forward (gradients,
    outputs, interventions) computes the function whose gradients are decomposed.

    In a model with a recurrent layer, cuDNN is off inside (restored after): its RNN backward
    runs in training mode only (`tests/test_cuda.py` runs a GRU on a GPU)."""
    training = [m for m in model.modules() if m.training]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    cudnn = torch.backends.cudnn.enabled
    for m in training:
        m.training = False
    torch.backends.mha.set_fastpath_enabled(False)
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        torch.backends.cudnn.enabled = False
    try:
        yield model
    finally:
        torch.backends.cudnn.enabled = cudnn
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m in training:
            m.training = True


@dataclass
class Target:
    """The model frozen at W0, with the names of the tensors under decomposition."""

    model: nn.Module
    names: list[str]
    w0: dict[str, Tensor]
    frozen: dict[str, Tensor]
    """The model's other parameters, detached: constants, so no gradient ever reaches the model."""

    @classmethod
    def create(cls, model: nn.Module, patterns: Iterable[str]) -> Target:
        check_loaded(model)
        names = select_parameters(model, patterns)
        params = dict(model.named_parameters())
        w0 = {n: params[n].detach().clone() for n in names}
        frozen = {n: p.detach() for n, p in params.items() if n not in w0}
        return cls(model, names, w0, frozen)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(w.shape) for n, w in self.w0.items()}

    def forward(self, inputs: Inputs, params: dict[str, Tensor] | None = None) -> Tensor:
        """f(inputs, W) with W = W0 except the given tensors; batch-first output tensor."""
        params = self.w0 if params is None else params
        args = (inputs,) if isinstance(inputs, Tensor) else ()
        kwargs = {} if isinstance(inputs, Tensor) else dict(inputs)
        kwargs.pop(SAMPLE_MASK, None)  # which positions are samples: L3D's, not the model's
        with evaluating(self.model):
            out = functional_call(self.model, {**self.frozen, **params}, args, kwargs)
        return output_tensor(out)

    @torch.no_grad()
    def outputs(self, inputs: Inputs) -> Tensor:
        return self.forward(inputs)

    def moved(
        self, direction: dict[str, Tensor], delta: float, names: Iterable[str] | None = None
    ) -> dict[str, Tensor]:
        """W0 + delta * direction (eq. 9), on `names` only (default: every decomposed tensor)."""
        delta = _finite_delta(delta)
        names = {names} if isinstance(names, str) else set(self.names if names is None else names)
        if not names:  # moving nothing would return the model's own outputs as if intervened on
            raise L3DError(
                f"params is empty: give decomposed tensors among {', '.join(self.names)}, or "
                "leave params out to move all"
            )
        if unknown := sorted(names - set(self.names)):
            # Skipping them would return the model's own outputs as if intervened on.
            raise L3DError(
                f"{unknown[0]!r} was not decomposed, so there is no subnetwork direction to move "
                f"it along: give params among {', '.join(self.names)}"
            )
        return {n: w + delta * direction[n] if n in names else w for n, w in self.w0.items()}


def _finite_delta(delta: object) -> float:
    """delta as a float, or an L3DError: NaN or inf along a direction gives NaN outputs silently."""
    if isinstance(delta, Tensor) and delta.numel() == 1:
        delta = delta.item()
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not math.isfinite(delta):
        raise L3DError(
            f"delta must be a finite number (the step along a unit direction, eq. 9); got {delta!r}"
        )
    return float(delta)
