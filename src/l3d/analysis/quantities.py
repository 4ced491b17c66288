"""The quantities of an analysis, computed from a decomposition and its inputs: tensors in, tensors
(or numbers) out, no files and no figures.

A sample is one row of `Decomposition.coefficients`: an input, or with per_token a valid
(sequence, position) pair; `positions` (from `SampleRows.positions`) maps sample rows to
(input, position).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from l3d.core.model import evaluating
from l3d.core.samples import Inputs, Referenced, batch_size_of, take, to_device
from l3d.core.subnetworks import Subnetworks
from l3d.decomposition import Decomposition
from l3d.errors import L3DError

# Samples ---------------------------------------------------------------------------------------


def top_samples(impact: Tensor, n_top: int) -> Tensor:
    """(n_v, n_top) sample indices of largest impact per subnetwork, largest first."""
    n_top = min(n_top, impact.shape[0])
    return impact.topk(n_top, dim=0).indices.T


def top_sample_purity(impact: Tensor, labels: Sequence[Any], n_top: int) -> Tensor:
    """(n_v,) fraction of each subnetwork's n_top highest-impact samples that share their most
    common label: 1 means the subnetwork's top samples all come from one class or task."""
    if len(labels) != impact.shape[0]:
        raise L3DError(f"{len(labels)} labels for {impact.shape[0]} samples: give one per sample")
    top = top_samples(impact, n_top)
    return torch.tensor(
        [Counter(labels[int(i)] for i in row).most_common(1)[0][1] / len(row) for row in top]
    )


def sample_labels(labels: Sequence[Any] | None, inputs: Inputs, positions: Tensor) -> list | None:
    """Labels per sample from labels per input (broadcast to its tokens) or per sample."""
    if labels is None:
        return None
    labels = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if len(labels) == positions.shape[0]:
        return labels
    if len(labels) == batch_size_of(inputs):
        return [labels[int(r)] for r in positions[:, 0]]
    raise L3DError(
        f"{len(labels)} labels for {batch_size_of(inputs)} inputs and {positions.shape[0]} "
        "samples: give one label per input or per sample"
    )


def random_samples(positions: Tensor, n: int, seed: int) -> Tensor:
    """About n random samples from whole random inputs: every input costs a forward pass however
    many of its tokens are used, so per-token samples come from as few sequences as possible."""
    generator = torch.Generator().manual_seed(seed)
    rows = positions[:, 0]
    chosen = torch.zeros(len(rows), dtype=torch.bool)
    for row in torch.randperm(int(rows.max()) + 1, generator=generator).tolist():
        chosen |= rows == row
        if int(chosen.sum()) >= n:
            break
    return torch.nonzero(chosen).flatten()


@torch.no_grad()
def pair_impacts(
    decomposition: Decomposition,
    pairs: Referenced,
    directions: Sequence[Subnetworks],
    *,
    chunk_size: int | None = None,
    progress: bool = False,
) -> list[Tensor]:
    """The impact of each set of directions on contrastive pairs (Section 4.2): |V_k . g_i| with
    g_i the gradient of the divergence from each input's own fixed reference, its counterpart's
    output, in place of `Decomposition.impacts`' mean over random references (a pair has one
    reference). (n_samples, n_v) each, in chunks of `chunk_size` inputs (default: the training
    batch size)."""
    from tqdm.auto import tqdm

    n, size = batch_size_of(pairs.inputs), chunk_size or decomposition.config.batch_size
    generator = torch.Generator()  # draws nothing: every reference is given
    parts: list[list[Tensor]] = [[] for _ in directions]
    for start in tqdm(range(0, n, size), desc="impact", unit="chunk", disable=not progress):
        rows = slice(start, start + size)
        chunk = to_device(take(pairs.inputs, rows), decomposition.device)
        references = pairs.references[rows].to(decomposition.device)
        batch = decomposition.gradient_source(chunk).batch(chunk, references, generator)
        for part, v in zip(parts, directions):
            part.append(batch.project(v).abs().cpu())
    return [torch.cat(part) for part in parts]


# Top logits ------------------------------------------------------------------------------------


def top_logits(
    decomposition: Decomposition,
    inputs: Inputs,
    k: int,
    samples: Tensor,
    n_logits: int = 10,
    direction: dict[str, Tensor] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The outputs subnetwork k pushes up and down on its samples: the mean over `samples` of
    d softmax / dδ along V_out_k, its n_logits largest ('positive') and most negative ('negative')
    entries as (indices, values), positive and negative values only. A direction's sign is
    arbitrary, so both lists matter."""
    mean = decomposition.output_derivative(inputs, k, samples, direction).mean(0)
    n_logits = min(n_logits, mean.numel())
    pos, neg = mean.topk(n_logits), (-mean).topk(n_logits)
    up, down = pos.values > 0, neg.values > 0
    return {
        "positive": (pos.indices[up], pos.values[up]),
        "negative": (neg.indices[down], -neg.values[down]),
    }


# Interventions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InterventionEffect:
    """Mean output change (the divergence's distance) at W0 - δ v_k and W0 + δ v_k, on a
    subnetwork's top samples and on random samples, and the noise floor below which a change is
    round-off (`Decomposition.output_change_and_floor`)."""

    delta: float
    top: tuple[float, float]
    """(minus, plus) on the top samples."""
    random: tuple[float, float]
    """(minus, plus) on the random samples."""
    noise_floor: float = 0.0
    """The largest change that round-off in the outputs alone can produce."""

    @property
    def below_noise(self) -> bool:
        """The change on random samples is below the noise floor (so the ratio would divide by
        round-off): true whenever both are."""
        return max(self.random) <= self.noise_floor

    @property
    def selectivity(self) -> float | None:
        """The larger change on the top samples over the larger change on random samples, or
        None when `below_noise`."""
        if self.below_noise or max(self.random) <= 0:
            return None
        return max(self.top) / max(self.random)


def intervention_effect(
    decomposition: Decomposition,
    inputs: Inputs,
    k: int,
    delta: float,
    top: Tensor,
    random: Tensor,
    direction: dict[str, Tensor] | None = None,
) -> InterventionEffect:
    """How far W0 ± delta v_k moves the outputs of the `top` samples and of the `random` ones
    that are not among them (sample rows: the baseline is the other samples, so that a ratio
    near 1 means not selective rather than the same samples), both measured in one pass: a
    forward at W0 and one per sign."""
    others = random[~torch.isin(random, top)]
    if not len(others):
        raise L3DError("no random samples outside the top ones: measure on more samples")
    effects, floor = decomposition.output_change_and_floor(
        inputs, k, (-delta, delta), torch.cat([top, others]), direction
    )
    on_top = effects[:, : len(top)].mean(1).tolist()
    on_random = effects[:, len(top) :].mean(1).tolist()
    return InterventionEffect(delta, (on_top[0], on_top[1]), (on_random[0], on_random[1]), floor)


@torch.no_grad()
def generate(
    decomposition: Decomposition,
    tokenizer: Any,
    prompt: str,
    k: int | None = None,
    delta: float = 0.0,
    max_new_tokens: int = 20,
) -> str:
    """Greedy continuation of `prompt` by the LM at W0 + δ v_k (at W0 when k is None)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    pad = getattr(tokenizer, "pad_token_id", None)
    return tokenizer.decode(generate_ids(decomposition, ids, k, delta, max_new_tokens, pad))


def can_generate(decomposition: Decomposition) -> bool:
    """Whether the decomposed model is a causal LM with `.generate()` (transformers)."""
    return hasattr(decomposition.model, "generate")


@torch.no_grad()
def generate_ids(
    decomposition: Decomposition,
    ids: Tensor,
    k: int | None = None,
    delta: float = 0.0,
    max_new_tokens: int = 20,
    pad_token_id: int | None = None,
) -> list[int]:
    """Greedy continuation (new token ids) of the prompt `ids` (seq,) by the LM at W0 + δ v_k (at
    W0 when k is None): max_new_tokens, or fewer where the model's context (its config's
    max_position_embeddings) ends first; none for a prompt that fills it."""
    model: Any = decomposition.model  # a transformers LM: generate() is not nn.Module's
    if not can_generate(decomposition):
        raise L3DError(
            f"{type(model).__name__} has no .generate(): text generation needs a causal LM"
        )
    prompt = ids.reshape(1, -1).to(decomposition.device)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    n_new = max_new_tokens if context is None else min(max_new_tokens, context - prompt.shape[1])
    if n_new <= 0:
        return []

    def run() -> list[int]:
        with evaluating(model):
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n_new,
                min_new_tokens=n_new,  # side-by-side columns of equal length
                do_sample=False,
                pad_token_id=pad_token_id,
            )
        return out[0, prompt.shape[1] :].tolist()

    if k is None:
        return run()
    with decomposition.perturbed(k, delta):
        return run()
