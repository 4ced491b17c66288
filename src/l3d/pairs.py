"""Contrastive-pair decomposition (paper Section 4.2): decompose the gradients of the divergence
between curated pairs of inputs, g_i = grad_W D(f(x_i, W), f(x'_i, W0)) at W0, with the
counterpart's output as the (detached) reference, into a few low-rank subnetworks.

Pairs that differ in one behaviour only (a clean and a corrupted prompt, an image and its edited
copy) isolate the parameters behind that behaviour, as activation patching does in activation
space. `top_k=None` lifts the sparsity constraint: every coefficient is kept, so the loss is a
plain rank-n_v reconstruction of the pair gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any, cast

import torch
from torch import Tensor, nn

from l3d.config import L3DConfig
from l3d.core.divergences import DivergenceFn, get_divergence
from l3d.core.gradients import per_sample_gradients
from l3d.core.model import Target
from l3d.core.samples import (
    SAMPLE_MASK,
    Inputs,
    Referenced,
    SampleRows,
    batch_size_of,
    check_finite,
    check_samples,
    describe_inputs,
    model_failure,
    take,
    to_device,
)
from l3d.decomposition import Decomposition, run
from l3d.errors import L3DError


def _shapes(inputs: Inputs) -> dict[str, tuple[int, ...]]:
    if isinstance(inputs, Tensor):
        return {"inputs": tuple(inputs.shape)}
    return {k: tuple(v.shape) for k, v in inputs.items() if k != SAMPLE_MASK}


def _dtypes(inputs: Inputs) -> dict[str, torch.dtype]:
    if isinstance(inputs, Tensor):
        return {"inputs": inputs.dtype}
    return {k: v.dtype for k, v in inputs.items() if k != SAMPLE_MASK}


def _check_like_inputs(counterparts: Inputs, inputs: Inputs) -> None:
    """Refuse counterparts the model cannot take as it takes the inputs: another structure (a
    dict for one tensor or the other way round), other keys or shapes, another dtype."""
    given, wanted = describe_inputs(counterparts), describe_inputs(inputs)
    if isinstance(inputs, Tensor) and not isinstance(counterparts, Tensor):
        raise L3DError(
            f"counterparts ({given}) are a dict, but the inputs are one tensor: give the "
            f"counterparts as one tensor too ({wanted}); their structure must match the inputs'"
        )
    if not isinstance(inputs, Tensor) and isinstance(counterparts, Tensor):
        raise L3DError(
            f"counterparts ({given}) are one tensor, but the inputs are a dict: give the "
            f"counterparts as a dict with the inputs' keys ({wanted}); their structure must match "
            "the inputs'"
        )
    if _shapes(counterparts) != _shapes(inputs):
        raise L3DError(
            f"counterparts ({given}) must have the inputs' shapes ({wanted}): one counterpart per "
            "input, aligned by row"
        )
    own, theirs = _dtypes(inputs), _dtypes(counterparts)
    odd = next((k for k in own if theirs[k] != own[k]), None)
    if odd is not None:
        raise L3DError(
            f"counterparts ({given}) must have the inputs' dtypes ({wanted}): convert them, "
            f"e.g. .to({own[odd]})"
        )


def no_difference(which: str = "the pairs'", positions: bool = False) -> L3DError:
    """The one error for pairs without a difference: every output at W0 equals its counterpart's,
    so every pair gradient is zero (nothing to decompose) and no step closes anything.
    positions: the pairs are compared at marked positions only (`positions`)."""
    if positions:
        return L3DError(
            f"{which} outputs are identical at W0 at the marked positions (each counterpart's "
            "output equals its input's there): there is no difference to decompose or close; "
            "mark positions where the outputs differ (at or after the changed tokens in a causal "
            "model), or give counterparts that change the model's output there"
        )
    return L3DError(
        f"{which} outputs are identical at W0 (each counterpart's output equals its input's): "
        "there is no difference to decompose or close; give counterparts that change the "
        "model's output"
    )


def _cat(parts: Sequence[Inputs]) -> Inputs:
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat([p for p in parts if isinstance(p, Tensor)])
    return {k: torch.cat([p[k] for p in parts if isinstance(p, dict)]) for k in first}


def with_positions(inputs: Inputs, positions: Tensor | None) -> Inputs:
    """The inputs with `positions` (batch, seq) as the per-token sample mask."""
    if positions is None:
        return inputs
    if not isinstance(positions, Tensor):
        kind = type(positions).__qualname__
        if type(positions).__module__ != "builtins":
            kind = f"{type(positions).__module__}.{kind}"
        raise L3DError(
            "positions must be a torch.Tensor (bool, shaped (batch, seq)) marking the positions "
            f"to compare; got {kind}: convert it, e.g. torch.as_tensor(positions).bool()"
        )
    if not isinstance(inputs, dict):
        raise L3DError(
            "positions= restricts per-token samples of dict inputs (input_ids, attention_mask, "
            "...): pass the inputs as a dict, e.g. {'input_ids': ids}"
        )
    first = next(iter(inputs.values()))
    if positions.shape != first.shape[:2] or positions.dtype != torch.bool:
        raise L3DError(
            f"positions must be a bool tensor shaped (batch, seq) = {tuple(first.shape[:2])} "
            f"marking the positions to compare; got {positions.dtype} {tuple(positions.shape)}"
        )
    return {**inputs, SAMPLE_MASK: positions}


@contextmanager
def _outputs_at_w0(model: nn.Module, batch_size: int) -> Iterator[Callable[..., Iterator[Tensor]]]:
    """`outputs(inputs, what)`: the model's outputs at W0, in eval mode, chunk by chunk. A model
    that fails on the first chunk (dtype, feature count, dict keys) is one line naming `what`."""
    device = next(model.parameters()).device
    # Any one tensor that can be decomposed: only the model's outputs are read.
    name = next(n for n, p in model.named_parameters() if p.is_floating_point() and p.dim())
    target = Target.create(model, [name])

    def outputs(inputs: Inputs, what: str) -> Iterator[Tensor]:
        n = batch_size_of(inputs)
        for i in range(0, n, batch_size):
            chunk = to_device(take(inputs, slice(i, i + batch_size)), device)
            if i > 0:
                yield target.outputs(chunk).detach()
                continue
            try:
                yield target.outputs(chunk).detach()
            except L3DError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise model_failure(err, f"{what}'", chunk) from err

    with torch.no_grad():
        yield outputs


def _no_rows(inputs: Inputs) -> None:
    if batch_size_of(inputs) == 0:
        raise L3DError(
            "no pairs: the inputs have 0 rows; give at least one input and its counterpart"
        )


def counterpart_outputs(model: nn.Module, counterparts: Inputs, batch_size: int = 256) -> Tensor:
    """f(x', W0) for every counterpart, in chunks, in eval mode: the pairs' fixed references."""
    _no_rows(counterparts)
    with _outputs_at_w0(model, batch_size) as outputs:
        return torch.cat(list(outputs(counterparts, "the counterparts")))


def _same(a: Tensor, b: Tensor, positions: Tensor | None) -> bool:
    """Whether outputs a and b are equal (at `positions` only, when given)."""
    if positions is not None:
        mask = positions.to(a.device)
        a, b = a[mask], b[mask]
    return torch.equal(a, b)


def _sequence_axis(outputs: Tensor, inputs: Inputs) -> bool:
    """Whether the outputs are per token, (batch, seq, ...) along dict inputs' (batch, seq)."""
    if not isinstance(inputs, dict):
        return False
    first = next(iter(inputs.values()))
    return outputs.dim() == 3 and first.dim() >= 2 and outputs.shape[1] == first.shape[1]


def _compared(inputs: Inputs, positions: Tensor | None) -> Tensor | None:
    """(batch, seq) bool, the positions compared in per-token pairs: `positions` (all when None)
    where the inputs have tokens (attention_mask 1); None for inputs with neither. Refuses
    positions that mark nothing or only padding (no sample: the run failed later)."""
    attention = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if positions is not None and not positions.any():
        raise L3DError(
            "positions mark no position: mark at least one (sequence, position) to compare"
        )
    if attention is None:
        return positions
    tokens = attention.to(positions.device if positions is not None else attention.device) != 0
    if positions is None:
        return tokens
    compared = positions & tokens
    if not compared.any():
        raise L3DError(
            "positions mark only padding (attention_mask 0): no marked position holds a token, "
            "so there is no sample; mark positions where the inputs' attention_mask is 1"
        )
    return compared


def _refuse_padded_references(
    inputs: Inputs, sets: Sequence[Inputs], positions: Tensor | None, symmetric: bool
) -> None:
    """Refuse pairs whose reference would be an output at a padding token: a compared position
    (marked, a token of the one compared) where the one giving the reference has
    attention_mask 0. Per-token pairs align input and counterpart by position."""
    if not isinstance(inputs, dict) or "attention_mask" not in inputs:
        return
    for j, c in enumerate(sets):
        assert isinstance(c, dict)  # keys as the inputs' (checked)
        note = f" (counterparts {j})" if len(sets) > 1 else ""
        directions = [(inputs, c, "the counterpart", "its input", "")]
        if symmetric:
            directions.append((c, inputs, "the input", "its counterpart", ", symmetric=True"))
        for first, other, whose, compared_one, why in directions:
            compared = first["attention_mask"] != 0
            if positions is not None:
                compared = compared & positions.to(compared.device)
            bad = torch.nonzero(compared & (other["attention_mask"] == 0))
            if len(bad):
                row, position = (int(i) for i in bad[0])
                raise L3DError(
                    f"{whose} of pair {row}{note} has padding (attention_mask 0) at position "
                    f"{position}, where {compared_one} is compared{why}: its output there is no "
                    "reference; pad the counterpart like its input (same length and padding "
                    "side), or mark positions only where both have tokens"
                )


def pair_data(
    model: nn.Module,
    inputs: Inputs,
    counterparts: Inputs | Sequence[Inputs],
    *,
    symmetric: bool = False,
    positions: Tensor | None = None,
    batch_size: int = 256,
) -> Referenced:
    """The pairs as data for `l3d.run`: each input with its counterpart's output as reference.

    counterparts: shaped like `inputs` (one counterpart per input), or a list of such (several
        counterparts per input: each makes its own pairs).
    symmetric: also decompose each pair the other way round (x' against x).
    positions: (batch, seq) bool, per-token models only: the positions compared (e.g. the answer
        token); the others are no samples. Aligned by position between input and counterpart.
    """
    sets: list[Inputs] = (
        list(counterparts)
        if isinstance(counterparts, (list, tuple))
        else [cast(Inputs, counterparts)]
    )
    if not sets:
        raise L3DError("no counterparts given: pass one input per input, or a list of such")
    _no_rows(inputs)
    for c in sets:
        _check_like_inputs(c, inputs)
        check_finite(c, "the counterparts")
    firsts: list[Inputs] = [inputs] * len(sets)
    if symmetric:
        firsts = [*firsts, *sets]
    own = _cat([with_positions(x, positions) for x in firsts])
    compared = _compared(inputs, positions)
    with _outputs_at_w0(model, batch_size) as outputs:
        inputs_outputs = outputs(inputs, "the inputs")
        first = next(inputs_outputs)  # a model that fails on the inputs is named on them
        if not _sequence_axis(first, inputs):
            if positions is not None:
                raise L3DError(
                    f"positions mark per-token samples, but the model's outputs "
                    f"{tuple(first.shape)} have no sequence axis (batch, seq, ...) along the "
                    "inputs': drop positions (a model with one output per input compares whole "
                    "inputs)"
                )
            compared = None  # one output per input: compared whole
        else:
            _refuse_padded_references(inputs, sets, positions, symmetric)
        references = [torch.cat(list(outputs(c, "the counterparts"))) for c in sets]
        # The inputs' own outputs: references when symmetric, else only compared, chunk by
        # chunk until a pair differs (usually in the first chunk).
        parts: list[Tensor] = []
        differ = False
        for part in chain([first], inputs_outputs):
            start = sum(len(p) for p in parts)
            rows = slice(start, start + len(part))
            mask = None if compared is None else compared[rows]
            differ = differ or any(not _same(part, r[rows], mask) for r in references)
            parts.append(part)
            if differ and not symmetric:
                break
    if not differ:
        # Every pair gradient would be zero: a decomposition to loss 0 that means nothing.
        raise no_difference(positions=positions is not None)
    if symmetric:
        references += [torch.cat(parts)] * len(sets)
    return Referenced(own, torch.cat(references))


def decompose_pairs(
    model: nn.Module,
    inputs: Inputs,
    counterparts: Inputs | Sequence[Inputs],
    *,
    params: Iterable[str] | str,
    n_subnetworks: int,
    rank: int | dict[str, int] = 1,
    top_k: float | None = None,
    divergence: str | DivergenceFn = "mse",
    symmetric: bool = False,
    positions: Tensor | None = None,
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Decomposition:
    """Decompose the pair gradients grad_W D(f(x_i), f(x'_i)) at W0 into `n_subnetworks` low-rank
    subnetworks (Section 4.2). Arguments as `l3d.decompose`, plus those of `pair_data`; top_k=None
    keeps every coefficient (no sparsity: a plain low-rank reconstruction). The result is an
    ordinary Decomposition (save, load, analysis, report) whose reference is 'counterpart'."""
    div = get_divergence(divergence)
    config = L3DConfig.create(
        params=[params] if isinstance(params, str) else list(params),
        n_subnetworks=n_subnetworks,
        rank=rank,
        top_k=1.0 if top_k is None else top_k,
        divergence=div.name,
        reference="counterpart",
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        **options,
    )
    _check_per_token(config, positions)
    data = pair_data(model, inputs, counterparts, symmetric=symmetric, positions=positions)
    custom = divergence if callable(divergence) else None
    return run(model, data, config, divergence=custom, progress=progress)


def _check_per_token(config: L3DConfig, positions: object) -> None:
    """positions mark per-token samples: refuse them for a run that is not per-token."""
    if positions is not None and not config.per_token:
        raise L3DError(
            "positions mark per-token samples, but the run is not per-token (per_token=False): "
            "pass per_token=True for a model whose outputs have a sequence axis (batch, seq, "
            "vocab), or drop positions"
        )


def _decomposition_pairs(
    decomposition: Decomposition,
    inputs: Inputs,
    counterparts: Inputs | Sequence[Inputs],
    positions: Tensor | None,
    symmetric: bool = False,
) -> Referenced:
    """`pair_data` for a decomposition's model, positions only for a per-token one."""
    _check_per_token(decomposition.config, positions)
    return pair_data(
        decomposition.model, inputs, counterparts, symmetric=symmetric, positions=positions
    )


def _sample_rows(decomposition: Decomposition, inputs: Inputs) -> SampleRows:
    """The pairs' sample rows; refuses pairs without a sample (a mean over none is NaN), in the
    analysis's words."""
    rows = SampleRows.of(inputs, decomposition.config.per_token)
    check_samples(rows.count(batch_size_of(inputs)))
    return rows


def pair_coefficients(
    decomposition: Decomposition,
    inputs: Inputs,
    counterparts: Inputs,
    positions: Tensor | None = None,
) -> Tensor:
    """c = V_in . grad_W D(f(x_i), f(x'_i)) per pair sample, (n_samples, n_v)."""
    data = _decomposition_pairs(decomposition, inputs, counterparts, positions)
    _sample_rows(decomposition, data.inputs)
    return decomposition.coefficients(data.inputs, references=data.references)


def _pairs(
    decomposition: Decomposition,
    inputs: Inputs | Referenced,
    counterparts: Inputs | None,
    positions: Tensor | None,
) -> Referenced:
    if isinstance(inputs, Referenced):
        if counterparts is not None or positions is not None:
            raise L3DError(
                "pass the pairs either as data (Referenced, from pair_data) or as inputs and "
                "counterparts (with positions), not both"
            )
        return inputs
    if counterparts is None:
        raise L3DError("counterparts missing: pass one counterpart per input")
    return _decomposition_pairs(decomposition, inputs, counterparts, positions)


@torch.no_grad()
def patching_scores(
    decomposition: Decomposition,
    inputs: Inputs | Referenced,
    counterparts: Inputs | None = None,
    *,
    positions: Tensor | None = None,
    deltas: Tensor | None = None,
    directions: Sequence[dict[str, Tensor]] | None = None,
) -> Tensor:
    """For each subnetwork k, the fraction of the pairs' output difference that moving along it
    closes: (D0 - min_delta D(delta)) / D0, with D(delta) the mean over pair samples of
    D(f(x_i, W0 + delta v_k), f(x'_i, W0)) and D0 = D(0); in [0, 1], (n_v,). deltas: the steps
    tried, default 81 values in [-2, 2] x ||W0|| (norm of the decomposed tensors). directions:
    other unit directions to score the same way ({param: tensor} each; e.g. baselines), instead
    of the subnetworks. inputs may also be the pairs as data (`pair_data`, a pair run's data),
    counterparts then None."""
    data = _pairs(decomposition, inputs, counterparts, positions)
    x = to_device(data.inputs, decomposition.device)
    refs = data.references.to(decomposition.device)
    rows = _sample_rows(decomposition, x)
    if deltas is None:
        deltas = torch.linspace(-2, 2, 81) * decomposition.weight_norm()
    distance = decomposition.divergence.fn

    def mean_divergence(outputs: Tensor) -> float:
        a, b = rows.rows(outputs), rows.rows(refs)
        return float(torch.vmap(distance)(a.flatten(1), b.flatten(1)).mean())

    base = mean_divergence(decomposition.intervene(x, 0, 0.0))
    if base <= 0:
        raise no_difference(positions=isinstance(x, dict) and SAMPLE_MASK in x)
    if directions is None:
        directions = [decomposition.v_out(k) for k in range(decomposition.n_subnetworks)]
    scores = []
    for direction in directions:
        best = min(
            mean_divergence(decomposition.intervene(x, 0, float(d), direction=direction))
            for d in deltas
        )
        scores.append(max(0.0, (base - best) / base))
    return torch.tensor(scores)


@torch.no_grad()
def switch_rates(
    decomposition: Decomposition,
    inputs: Inputs,
    counterparts: Inputs,
    deltas: Tensor,
    *,
    positions: Tensor | None = None,
    directions: Sequence[dict[str, Tensor]] | None = None,
) -> Tensor:
    """For each direction (default: the subnetworks) and step delta, the fraction of pair samples
    whose top output (argmax: the answer token, the class) at W0 + delta v equals the
    counterpart's at W0: how often moving along v switches the answer to the counterpart's.
    Counted over the pair samples whose answers differ at W0 (the others have nothing to
    switch). (n_directions, len(deltas))."""
    data = _decomposition_pairs(decomposition, inputs, counterparts, positions)
    x = to_device(data.inputs, decomposition.device)
    rows = _sample_rows(decomposition, x)
    wanted = rows.rows(data.references.to(decomposition.device)).argmax(-1)
    differ = rows.rows(decomposition.intervene(x, 0, 0.0)).argmax(-1) != wanted
    if not differ.any():
        raise L3DError("every pair has the same answer (argmax) at W0: there is nothing to switch")
    if directions is None:
        directions = [decomposition.v_out(k) for k in range(decomposition.n_subnetworks)]

    def switched(outputs: Tensor) -> float:
        return float((rows.rows(outputs).argmax(-1) == wanted)[differ].float().mean())

    return torch.tensor(
        [
            [switched(decomposition.intervene(x, 0, float(d), direction=v)) for d in deltas]
            for v in directions
        ]
    )


def pair_gradients(
    decomposition: Decomposition,
    inputs: Inputs,
    counterparts: Inputs | Sequence[Inputs],
    *,
    symmetric: bool = False,
    positions: Tensor | None = None,
) -> dict[str, Tensor]:
    """The dense pair gradients g_i = grad_W D(f(x_i, W), f(x'_i, W0)) at W0 that the
    decomposition reconstructs, {param: (n_samples, *shape)}, for baselines (small models only:
    n_samples x n_w memory)."""
    data = _decomposition_pairs(decomposition, inputs, counterparts, positions, symmetric)
    gradients = per_sample_gradients(
        decomposition.target,
        to_device(data.inputs, decomposition.device),
        data.references.to(decomposition.device),
        decomposition.divergence.fn,
        per_token=decomposition.config.per_token,
        chunk_size=decomposition.config.batch_size,
    )
    return {name: g.detach() for name, g in gradients.items()}


def singular_directions(gradients: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """The PCA baseline: the top n right singular vectors of the stacked gradients, each gradient
    normalised to unit norm first so every pair counts alike (as eq. 8 weighs them), uncentred.
    {param: (n, *shape)}, unit global norm each."""
    names = list(gradients)
    flat = torch.cat([gradients[p].flatten(1) for p in names], 1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    sizes = [gradients[p][0].numel() for p in names]
    return {
        p: part.reshape(n, *gradients[p].shape[1:])
        for p, part in zip(names, vh[:n].split(sizes, dim=1))
    }


def unit_directions(directions: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """{param: (n, *shape)} as a list of n directions {param: tensor}, as `patching_scores` and
    `switch_rates` take them."""
    n = len(next(iter(directions.values())))
    return [{p: d[k] for p, d in directions.items()} for k in range(n)]


def _pair_divergence(
    decomposition: Decomposition, data: Referenced
) -> Callable[[float, dict[str, Tensor]], float]:
    """(delta, v) -> the mean over the pairs' samples of D(f(x_i, W0 + delta v), f(x'_i, W0))."""
    x = to_device(data.inputs, decomposition.device)
    rows = _sample_rows(decomposition, x)
    refs = rows.rows(data.references.to(decomposition.device))
    distance = decomposition.divergence.fn

    def at(delta: float, direction: dict[str, Tensor]) -> float:
        outputs = rows.rows(decomposition.intervene(x, 0, delta, direction=direction))
        return float(torch.vmap(distance)(outputs.flatten(1), refs.flatten(1)).mean())

    return at


@torch.no_grad()
def off_target_scores(
    decomposition: Decomposition,
    target: Referenced,
    other: Referenced,
    *,
    deltas: Tensor | None = None,
    directions: Sequence[dict[str, Tensor]] | None = None,
) -> Tensor:
    """The off-target counterpart of `patching_scores`: for each direction v_k (default the
    subnetworks), the step delta_k that closes most of the `target` pairs' difference (the step
    `patching_scores` scores; the first of equal ones), and the fraction of the `other` pairs'
    mean divergence that the same move removes, 1 - D_other(delta_k) / D_other(0). Near 0 for a
    direction that leaves the other behaviour alone; negative where it pushes the other pairs
    apart. target, other: pairs as data (`pair_data`). deltas as in `patching_scores`.
    (n_directions,)."""
    if deltas is None:
        deltas = torch.linspace(-2, 2, 81) * decomposition.weight_norm()
    if directions is None:
        directions = [decomposition.v_out(k) for k in range(decomposition.n_subnetworks)]
    own, off = _pair_divergence(decomposition, target), _pair_divergence(decomposition, other)
    base = off(0.0, directions[0])
    if base <= 0:
        raise no_difference("the other pairs'")
    scores = []
    for v in directions:
        step = min((float(d) for d in deltas), key=lambda d: own(d, v))
        scores.append(1 - off(step, v) / base)
    return torch.tensor(scores)
