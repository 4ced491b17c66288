"""Samples: the user's data as batches of inputs, and the one map from a batch to its sample rows.

A sample is one row of the coefficient matrix c (Section 2.3): an input, or with per_token a
(sequence, position) pair whose attention mask is 1 (Section 3.5.1: each token of a language model
is a sample; padding never is). `SampleRows` is the only code that turns (batch, seq, ...) tensors
into (n_samples, ...) rows and back; every backend, the references and the analysis go through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from l3d.errors import L3DError

Inputs = Tensor | dict[str, Tensor]

SAMPLE_MASK = "l3d_sample_mask"
"""An inputs dict entry (batch, seq) bool that restricts per-token samples to some positions
(contrastive pairs: the positions where the answer differs); never passed to the model."""


def describe_inputs(inputs: Inputs) -> str:
    """'tensor float32 (2, 5)' or 'dict {input_ids: int64 (2, 16), ...}' for error messages."""

    def one(t: Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"

    if isinstance(inputs, Tensor):
        return f"tensor {one(inputs)}"
    return "dict {" + ", ".join(f"{k}: {one(v)}" for k, v in inputs.items()) + "}"


def model_failure(err: Exception, whose: str, inputs: Inputs) -> L3DError:
    """The one line for a model that fails on `inputs` (`whose`: "the data's", "the
    counterparts'"): a data/model mismatch (feature count, dtype, missing key) surfaces as
    torch's error deep inside the model, so name the inputs and say which side to check."""
    return L3DError(
        f"the model fails on {whose} first samples ({describe_inputs(inputs)}): "
        f"{str(err).splitlines()[0]}. Check that the data matches the model's input "
        "(feature count, dtype, dict keys)"
    )


def check_samples(n_samples: int) -> None:
    """Refuse measuring on no samples (a mean over none is NaN, or a score of 0)."""
    if n_samples == 0:
        raise L3DError(
            "no samples to analyse: the inputs are empty, or every position is padding "
            "(attention_mask 0) or outside the pairs' positions"
        )


def batch_size_of(inputs: Inputs) -> int:
    return (inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))).shape[0]


def take(inputs: Inputs, index: Tensor | slice | int) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return {k: v.to(device) for k, v in inputs.items()}


def batch_inputs(batch: object) -> Inputs:
    """A batch as given by the user: a tensor, a dict of tensors, or a (inputs, labels...) tuple."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]  # L3D is unsupervised: labels from a DataLoader are ignored.
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping) and all(isinstance(v, Tensor) for v in batch.values()):
        if not batch:
            raise L3DError(
                "the data dict is empty: give the model's inputs by name, e.g. "
                "{'input_ids': ..., 'attention_mask': ...}"
            )
        rows = {k: v.shape[0] if v.dim() else 0 for k, v in batch.items()}
        if len(set(rows.values())) > 1:
            counts = " and ".join(str(n) for n in dict.fromkeys(rows.values()))
            each = ", ".join(f"{k}: {n}" for k, n in rows.items())
            raise L3DError(
                f"the data dict's entries have {counts} rows ({each}): give every entry one row "
                "per sample"
            )
        return dict(batch)
    raise L3DError(
        f"a data batch is a {type(batch).__name__}; L3D takes a tensor of inputs, a dict of "
        "tensors (e.g. input_ids + attention_mask), or an iterable of such batches"
    )


def as_inputs(data: object) -> Inputs:
    """All of the user's data as one tensor or dict of tensors (batches concatenated): for the
    analysis, which addresses samples by row."""
    if isinstance(data, (Tensor, Mapping)):
        return batch_inputs(data)
    if not isinstance(data, Iterable):
        raise L3DError(f"data is a {type(data).__name__}; pass a tensor, a dict or batches")
    batches = [batch_inputs(b) for b in data]
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat([cast(Tensor, b) for b in batches])
    return {k: torch.cat([cast(dict, b)[k] for b in batches]) for k in first}


def check_finite(
    inputs: Inputs, what: str = "data", fix: str = "clean or drop those samples first"
) -> None:
    tensors = [inputs] if isinstance(inputs, Tensor) else list(inputs.values())
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise L3DError(f"{bad} NaN/inf values in {what}: {fix}")


@dataclass(frozen=True)
class Referenced:
    """Inputs with a fixed reference output per input (contrastive pairs, paper Section 4.2: the
    counterpart's output at W0), instead of references drawn from the batch."""

    inputs: Inputs
    references: Tensor
    """(n, *output shape), detached, aligned with the inputs' rows."""


def split_held_out(
    data: object, fraction: float, generator: torch.Generator
) -> tuple[object, object]:
    """(training data, held-out data): a seeded random `fraction` of the inputs (at least 2) kept
    out of training, each part keeping its references when `data` is `Referenced`."""
    inputs = data.inputs if isinstance(data, Referenced) else data
    if not isinstance(inputs, (Tensor, Mapping)):
        raise L3DError(
            f"heldout_fraction={fraction} needs the data as one tensor or dict of tensors, got "
            f"{type(inputs).__name__}: concatenate the batches, or keep held-out batches out "
            "of the data yourself and set heldout_fraction=0"
        )
    inputs = batch_inputs(inputs)
    n = batch_size_of(inputs)
    n_held = max(2, round(fraction * n))
    if n - n_held < 2:
        raise L3DError(
            f"heldout_fraction={fraction} of {n} inputs leaves {n - n_held} to train on: use more "
            "data or a smaller heldout_fraction"
        )
    order = torch.randperm(n, generator=generator)
    held, kept = order[:n_held].sort().values, order[n_held:].sort().values

    def part(rows: Tensor) -> object:
        if isinstance(data, Referenced):
            return Referenced(take(inputs, rows), data.references[rows])
        return take(inputs, rows)

    return part(kept), part(held)


class Dataset:
    """The user's data as re-iterable batches: a tensor / dict of tensors (shuffled and batched
    here, seeded), `Referenced` inputs (batched with their references), or an iterable of batches
    (used as given, each epoch)."""

    def __init__(self, data: object, batch_size: int, device: str | torch.device = "cpu") -> None:
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.references: Tensor | None = None
        if isinstance(data, Referenced):
            n = batch_size_of(data.inputs)
            if data.references.shape[0] != n:
                raise L3DError(
                    f"{data.references.shape[0]} references for {n} inputs: give one per input"
                )
            self.references = data.references.detach()
            data = data.inputs
        if isinstance(data, (Tensor, Mapping)):
            self.inputs: Inputs | None = batch_inputs(data)
            self.batches_given = None
            n = batch_size_of(self.inputs)
            if n < 2:
                raise L3DError(
                    "L3D needs at least 2 samples (each sample's reference is another sample); "
                    f"got {n}"
                )
            check_finite(self.inputs)
        else:
            if (
                isinstance(data, tuple)
                and len(data) > 1
                and all(isinstance(t, Tensor) for t in data)
            ):
                # A DataLoader's batches are (inputs, labels) tuples; at the top level such a
                # tuple would be read as len(data) batches, the labels decomposed as inputs.
                raise L3DError(
                    f"data is a tuple of {len(data)} tensors, which L3D would read as "
                    f"{len(data)} batches; if it is (inputs, labels), pass the inputs alone "
                    "(L3D uses no labels); to give batches, pass a list of them"
                )
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
        for inputs, _ in self.referenced_batches(generator, shuffle):
            yield inputs

    def referenced_batches(
        self, generator: torch.Generator | None, shuffle: bool = True
    ) -> Iterator[tuple[Inputs, Tensor | None]]:
        """Batches with their fixed references (None when references are drawn per batch)."""
        if self.batches_given is not None:
            for batch in self.batches_given:
                inputs = batch_inputs(batch)
                if batch_size_of(inputs) < 2:
                    continue  # a lone sample has no other sample to serve as its reference
                check_finite(inputs, "a data batch")
                yield to_device(inputs, self.device), None
            return
        assert self.inputs is not None
        n = batch_size_of(self.inputs)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            if len(index) >= 2:
                refs = None if self.references is None else self.references[index]
                yield (
                    to_device(take(self.inputs, index), self.device),
                    (None if refs is None else refs.to(self.device)),
                )

    def n_batches(self) -> int | None:
        if self.inputs is None:
            try:
                return len(self.batches_given)  # type: ignore[arg-type]
            except TypeError:
                return None
        n = batch_size_of(self.inputs)
        full, rest = divmod(n, self.batch_size)
        return full + (rest >= 2)


@dataclass(frozen=True)
class SampleRows:
    """Which entries of a batch's outputs are samples, and the map to and from sample rows.

    Without per_token every input is one sample. With per_token, outputs are (batch, seq, ...) and
    `mask` (batch, seq) marks the positions that are samples: the attention mask when the inputs
    carry one, else every position. Rows are ordered sequence-major, then by position.
    """

    per_token: bool
    mask: Tensor | None
    """(batch, seq) bool with per_token; None without."""

    @classmethod
    def of(cls, inputs: Inputs, per_token: bool) -> SampleRows:
        if not per_token:
            return cls(False, None)
        if isinstance(inputs, dict) and SAMPLE_MASK in inputs:
            mask = inputs[SAMPLE_MASK].bool()
            if "attention_mask" in inputs:
                mask = mask & inputs["attention_mask"].bool()
            return cls(True, mask)
        if isinstance(inputs, dict) and "attention_mask" in inputs:
            return cls(True, inputs["attention_mask"].bool())
        ids = inputs["input_ids"] if isinstance(inputs, dict) and "input_ids" in inputs else None
        if ids is None:
            ids = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
        if ids.dim() < 2:
            raise L3DError(
                "per_token=True needs inputs shaped (batch, seq, ...); "
                f"got {describe_inputs(inputs)}"
            )
        return cls(True, torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device))

    def count(self, batch: int) -> int:
        """Number of samples in a batch of `batch` inputs."""
        return batch if self.mask is None else int(self.mask.sum())

    def rows(self, x: Tensor) -> Tensor:
        """(batch, seq, ...) -> (n_samples, ...) with per_token; unchanged (batch, ...) without."""
        return x if self.mask is None else x[self.mask.to(x.device)]

    def fill(self, rows: Tensor, full: Tensor) -> Tensor:
        """Inverse of `rows`: a copy of `full` (shaped like the batch's outputs) whose sample
        entries are replaced by `rows`; entries that are no sample keep full's value."""
        if self.mask is None:
            return rows.reshape(full.shape)
        out = full.clone()
        out[self.mask.to(full.device)] = rows
        return out

    def weights(self, like: Tensor) -> Tensor | None:
        """(batch, seq, 1) 0/1 factors that zero what is no sample, or None when all are."""
        if self.mask is None:
            return None
        return self.mask.to(like.device, like.dtype).unsqueeze(-1)

    def positions(self, batch: int) -> Tensor:
        """(n_samples, 2) long: (input row, token position) of each sample, in row order; the
        position is 0 without per_token."""
        if self.mask is None:
            return torch.stack([torch.arange(batch), torch.zeros(batch, dtype=torch.long)], 1)
        return torch.nonzero(self.mask.cpu())
