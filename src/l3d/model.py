"""The frozen model under decomposition: parameter selection, functional calls at W0 (+ directions),
and normalisation of the user's data into batches of inputs and sample masks."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from l3d.errors import L3DError

Inputs = Tensor | dict[str, Tensor]


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
    return [n for n in names if n in selected]


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
    """The model's prediction: a tensor, an object with .logits (HuggingFace), or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise L3DError(
        f"the model returned {type(output).__name__}; L3D needs a tensor, an object with .logits, "
        "or a tuple whose first item is the output tensor"
    )


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
        return output_tensor(functional_call(self.model, {**self.frozen, **params}, args, kwargs))

    @torch.no_grad()
    def outputs(self, inputs: Inputs) -> Tensor:
        return self.forward(inputs)


# Data ----------------------------------------------------------------------------------------


def batch_size_of(inputs: Inputs) -> int:
    return (inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))).shape[0]


def take(inputs: Inputs, index: Tensor | slice) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return {k: v.to(device) for k, v in inputs.items()}


def token_mask(inputs: Inputs) -> Tensor | None:
    """(batch, seq) bool mask of positions that are samples, from an 'attention_mask' if given."""
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        return inputs["attention_mask"].bool()
    return None


def _as_inputs(batch: object) -> Inputs:
    """A batch as given by the user: a tensor, a dict of tensors, or a (inputs, labels...) tuple."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]  # L3D is unsupervised: labels from a DataLoader are ignored.
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping) and all(isinstance(v, Tensor) for v in batch.values()):
        return dict(batch)
    raise L3DError(
        f"a data batch is a {type(batch).__name__}; L3D takes a tensor of inputs, a dict of tensors "
        "(e.g. input_ids + attention_mask), or an iterable of such batches"
    )


def check_finite(inputs: Inputs, what: str = "data") -> None:
    tensors = [inputs] if isinstance(inputs, Tensor) else list(inputs.values())
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise L3DError(
                f"{what} contains {bad} NaN/inf values: clean or drop those samples first"
            )


class Dataset:
    """The user's data as re-iterable batches: a tensor / dict of tensors (shuffled and batched
    here, seeded) or an iterable of batches (used as given, each epoch)."""

    def __init__(self, data: object, batch_size: int, device: str | torch.device = "cpu") -> None:
        self.batch_size = batch_size
        self.device = torch.device(device)
        if isinstance(data, (Tensor, Mapping)):
            self.inputs: Inputs | None = _as_inputs(data)
            self.batches_given = None
            n = batch_size_of(self.inputs)
            if n < 2:
                raise L3DError(
                    f"L3D needs at least 2 samples (each sample's reference is another sample); got {n}"
                )
            check_finite(self.inputs)
        else:
            if not isinstance(data, Iterable):
                raise L3DError(
                    f"data is a {type(data).__name__}; pass a tensor of inputs, a dict of tensors, "
                    "or an iterable of batches"
                )
            if iter(data) is data:
                raise L3DError(
                    "data is a one-shot iterator, but L3D iterates over it once per epoch: pass a "
                    "list of batches or a DataLoader"
                )
            self.inputs = None
            self.batches_given = data

    @property
    def n_samples(self) -> int | None:
        return None if self.inputs is None else batch_size_of(self.inputs)

    def batches(self, generator: torch.Generator | None, shuffle: bool = True) -> Iterator[Inputs]:
        if self.inputs is None:
            for batch in self.batches_given:
                inputs = _as_inputs(batch)
                if batch_size_of(inputs) < 2:
                    continue  # a lone sample has no other sample to serve as its reference
                check_finite(inputs, "a data batch")
                yield to_device(inputs, self.device)
            return
        n = batch_size_of(self.inputs)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            if len(index) >= 2:
                yield to_device(take(self.inputs, index), self.device)

    def n_batches(self) -> int | None:
        if self.inputs is None:
            try:
                return len(self.batches_given)  # type: ignore[arg-type]
            except TypeError:
                return None
        n = batch_size_of(self.inputs)
        full, rest = divmod(n, self.batch_size)
        return full + (rest >= 2)
