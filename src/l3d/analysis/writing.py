"""The analysis written to a folder: analysis.json, analysis.md, p_active.png and
impact.safetensors, and for image inputs the top samples' images and a grid per subnetwork."""

from __future__ import annotations

import html
import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import BaseModel, Field, NonNegativeInt, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from l3d import hf, io, plots
from l3d.analysis.quantities import (
    InterventionEffect,
    can_generate,
    generate_ids,
    intervention_effect,
    pair_impacts,
    random_samples,
    sample_labels,
    top_logits,
    top_sample_purity,
    top_samples,
)
from l3d.core.distributed import Group
from l3d.core.samples import Inputs, Referenced, SampleRows, batch_size_of, check_samples
from l3d.decomposition import Decomposition
from l3d.errors import L3DError
from l3d.pairs import patching_scores


@dataclass(frozen=True)
class AnalysisOptions:
    """How `write_analysis` measures.

    n_top: samples shown per subnetwork, and over which top-sample purity is counted.
    n_references: random references averaged over in the impact.
    n_logits: outputs listed of each sign.
    intervention_scale: interventions use δ = ±scale · ‖W0‖ (norm of the decomposed tensors) and
        report the output change on the subnetwork's top samples and on random samples;
        selectivity is the larger of the first over the larger of the second (0.02 gave the most
        selective interventions on the digits demo; far larger steps leave the local regime),
        or None ("below noise") when the change on random samples is below the noise floor of
        `Decomposition.output_change_and_floor`.
    baseline: with labels, also measure the purity of random directions of the same ranks.
    n_generations: for a causal LM with a tokenizer, greedy continuations of this many of each
        live subnetwork's top samples (the context up to the sample token) at W0 - δ v_k, W0 and
        W0 + δ v_k, side by side in the report; 0 for none.
    generation_tokens: tokens generated per continuation.
    generation_scale: δ of the continuations, as a multiple of ‖W0‖. Larger than
        `intervention_scale`: a greedy token changes only once a logit gap is crossed, and the
        continuations are there to show what the subnetwork does, not to measure locally.
    seed: seeds the references, the random samples and the random directions.
    data: the file the inputs came from when they are not the run's own data (`l3d analyze
        --data`), recorded in the summary so that readers (`l3d control`) can tell analyses of
        other inputs apart.
    chunk_size: inputs per chunk of the impact (default: the training batch size).
    progress: show progress bars (impact, then the subnetworks' samples, logits, interventions).
    """

    n_top: int = 10
    n_references: int = 10
    n_logits: int = 10
    intervention_scale: float = 0.02
    n_generations: int = 2
    generation_tokens: int = 8
    generation_scale: float = 0.1
    baseline: bool = True
    seed: int = 0
    chunk_size: int | None = None
    progress: bool = True
    data: str | None = None

    def __post_init__(self) -> None:
        # Out of range, these gave NaN medians (n_top 0) or empty measurements without a word.
        at_least = {"n_top": 1, "n_references": 1, "n_logits": 0, "n_generations": 0}
        at_least |= {"generation_tokens": 1, "chunk_size": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is None and name == "chunk_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise L3DError(f"AnalysisOptions.{name} must be an int >= {low}; got {value!r}")
        for name in ("intervention_scale", "generation_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise L3DError(
                    f"AnalysisOptions.{name} must be a finite number > 0 (a multiple of ||W0||); "
                    f"got {value!r}"
                )


def write_analysis(
    decomposition: Decomposition,
    inputs: Inputs | Referenced,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    labels: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
    options: AnalysisOptions = AnalysisOptions(),
) -> dict | None:
    """Analyse every subnetwork on `inputs` and write out_dir/analysis.json, analysis.md,
    p_active.png, impact.safetensors (the full impact matrix (n_samples, n_v), the samples'
    (input, position), and the random baseline's impact), and for images images/ and grids/.
    Returns the analysis.json content.

    Under a torch.distributed process group every rank calls it: the ranks split the impact
    pass (the bulk of the work on a large dataset) and rank 0 does the rest and writes; the other
    ranks return None once their share is done.

    inputs: the inputs, or contrastive pairs as data (`l3d.pairs.pair_data`, a pair run's data):
        then each impact uses the input's own reference (its counterpart's output) and every
        subnetwork also gets its patching score on these pairs (`l3d.pairs.patching_scores`).
    tokenizer: decodes token ids (anything with .decode(list[int])) for per-token samples.
    labels: a class or task per input or per sample; enables top-sample purity, compared with
        random directions of the same ranks when options.baseline.
    class_names: names for integer labels and for the model's output classes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = inputs if isinstance(inputs, Referenced) else None
    inputs = inputs.inputs if isinstance(inputs, Referenced) else inputs
    per_token = decomposition.config.per_token
    positions = SampleRows.of(inputs, per_token).positions(batch_size_of(inputs))
    check_sample_count(len(positions), options.n_top)
    labels = sample_labels(labels, inputs, positions)
    describe = _Describer(
        inputs, positions, per_token, tokenizer, labels, class_names,
        out if _is_image_batch(inputs, per_token) else None,
    )  # fmt: skip

    directions = [decomposition.subnetworks.v_in]
    if options.baseline and labels is not None:
        directions.append(decomposition.subnetworks.v_out.random_like(options.seed + 1))
    group = Group.current()
    others = group is not None and not group.lead
    if pairs is None:
        measured = decomposition.impacts(
            inputs,
            directions,
            n_references=options.n_references,
            seed=options.seed,
            chunk_size=options.chunk_size,
            progress=options.progress,
        )
    elif others:
        return None  # a pair run's impacts are not split: rank 0 computes them
    else:
        measured = pair_impacts(
            decomposition, pairs, directions, chunk_size=options.chunk_size,
            progress=options.progress,
        )  # fmt: skip
    if others:
        return None
    impact = measured[0]
    n_samples, n_v = impact.shape
    top = top_samples(impact, options.n_top)
    p_active = decomposition.p_active.cpu()
    delta = options.intervention_scale * decomposition.weight_norm()
    random = random_samples(positions, max(4 * options.n_top, 64), options.seed)
    with torch.no_grad():
        dense = decomposition.subnetworks.v_out.materialize()  # once: (n_v, *shape) per tensor

    generating = (
        per_token
        and tokenizer is not None
        and options.n_generations > 0
        and can_generate(decomposition)
    )
    describe.generation = (
        options.generation_scale * decomposition.weight_norm(),
        options.generation_tokens,
    )
    records: list[dict[str, Any]] = []
    bar = tqdm(range(n_v), desc="analysis", unit="subnetwork", disable=not options.progress)
    for k in bar:
        samples = [describe.sample(s, float(impact[s, k])) for s in top[k].tolist()]
        direction = {n: d[k] for n, d in dense.items()}
        logits = top_logits(decomposition, inputs, k, top[k], options.n_logits, direction)
        effect = intervention_effect(decomposition, inputs, k, delta, top[k], random, direction)
        record: dict[str, Any] = {
            "index": k,
            "p_active": float(p_active[k]),
            "dead": bool(p_active[k] == 0),
            "mean_impact": float(impact[:, k].mean()),
            "top_samples": samples,
            "top_logits": {
                sign: [
                    {"label": describe.output(int(i)), "index": int(i), "value": float(v)}
                    for i, v in zip(*logits[sign])
                ]
                for sign in ("positive", "negative")
            },
            "intervention": _intervention_record(effect),
        }
        if describe.images is not None:
            record["grid"] = describe.grid(k, top[k], samples, float(p_active[k]))
        if generating and not record["dead"]:
            prompts = describe.distinct_prompts(top[k].tolist(), options.n_generations)
            record["generations"] = [describe.continuations(decomposition, s, k) for s in prompts]
        records.append(record)

    if pairs is not None:
        for r, score in zip(records, patching_scores(decomposition, pairs).tolist()):
            r["patching_score"] = score
    records.sort(key=lambda r: -r["p_active"])
    live_effects = [r["intervention"] for r in records if not r["dead"]]
    ratios = [i["selectivity"] for i in live_effects if not i["below_noise"]]
    summary: dict[str, Any] = {
        "n_samples": n_samples,
        "n_subnetworks": n_v,
        "n_dead": sum(r["dead"] for r in records),
        "n_references": 1 if pairs is not None else options.n_references,
        "pairs": pairs is not None,
        "n_top": options.n_top,
        "data": options.data,
        "per_token": per_token,
        "divergence": decomposition.config.divergence,
        "loss_paper": decomposition.evaluation.loss_paper,
        "loss_pooled_squared": decomposition.evaluation.loss_pooled_squared,
        "intervention_delta": delta,
        "generation_delta": describe.generation[0] if generating else None,
        # Over live subnetworks whose interventions measure above round-off (None if none).
        "median_intervention_selectivity": (
            float(torch.tensor(ratios).median()) if ratios else None
        ),
        "n_intervention_below_noise": len(live_effects) - len(ratios),
        "weight_norm": decomposition.weight_norm(),
        "best_patching_score": (
            max(r["patching_score"] for r in records) if pairs is not None else None
        ),
        "change_label": decomposition.divergence.change_label,
        "derivative_label": decomposition.divergence.derivative_label,
    }
    if labels is not None:
        live = p_active > 0
        purity = top_sample_purity(impact, labels, options.n_top)
        for r in records:
            r["purity"] = float(purity[r["index"]])
        summary["purity"] = float(purity[live].mean()) if live.any() else 0.0
        summary["majority_label_fraction"] = Counter(labels).most_common(1)[0][1] / n_samples
        if len(measured) > 1:
            summary["purity_random_directions"] = float(
                top_sample_purity(measured[1], labels, options.n_top).mean()
            )
    result = {"summary": summary, "subnetworks": records}
    tensors = {"impact": impact, "sample_positions": positions}
    if len(measured) > 1:
        tensors["impact_random_directions"] = measured[1]
    io.save_tensors(out / "impact.safetensors", tensors)
    io.write_json(out / "analysis.json", result)
    plots.plot_p_active(p_active, out / "p_active.png", sort=True)
    io.write_text(out / "analysis.md", _markdown(result, describe.images is not None))
    return result


def check_sample_count(n_samples: int, n_top: int | None = None) -> None:
    """Refuse measuring on no samples; with n_top, also a top set that leaves no other samples
    (selectivity compares each subnetwork's top samples with the others)."""
    check_samples(n_samples)
    if n_top is not None and n_top >= n_samples:
        raise L3DError(
            f"--n-top {n_top} is not below the {n_samples} samples analysed (AnalysisOptions."
            "n_top): selectivity compares a subnetwork's top samples with the others; give a "
            "smaller --n-top, or more samples (--n-samples)"
        )


def _is_image_batch(inputs: Inputs, per_token: bool) -> bool:
    return (
        isinstance(inputs, Tensor)
        and not per_token
        and inputs.dim() == 4
        and inputs.shape[1] in (1, 3)
    )


def _name(label: Any, class_names: Sequence[str] | None) -> str:
    if class_names is not None and isinstance(label, int) and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


@dataclass
class _Describer:
    """What analysis.json shows of sample rows and output indices: text and token, label, and for
    image inputs their PNGs under `images` (the analysis folder), each input saved once."""

    inputs: Inputs
    positions: Tensor
    per_token: bool
    tokenizer: Any
    labels: list | None
    class_names: Sequence[str] | None
    images: Path | None
    saved: dict[int, str] = field(default_factory=dict)
    generation: tuple[float, int] = (0.0, 0)
    """(δ, new tokens) of `continuations`."""
    at_w0: dict[int, str] = field(default_factory=dict)
    """The W0 continuation of each sample's prompt, generated once for all subnetworks."""

    def __post_init__(self) -> None:
        if self.images is not None:
            (self.images / "images").mkdir(exist_ok=True)
            (self.images / "grids").mkdir(exist_ok=True)

    def sample(self, s: int, impact: float) -> dict[str, Any]:
        row, pos = (int(v) for v in self.positions[s])
        entry: dict[str, Any] = {
            "sample": s,
            "impact": impact,
            "text": None,
            "token": None,
            "image": None,
            "label": None if self.labels is None else _name(self.labels[s], self.class_names),
        }
        if self.per_token:
            entry["input"], entry["position"] = row, pos
            if self.tokenizer is not None:
                entry["text"] = self.tokenizer.decode(self._tokens(row, pos).tolist())
            entry["token"] = hf.token_text(self.tokenizer, int(self._ids()[row, pos]))
        if self.images is not None:
            if row not in self.saved:
                self.saved[row] = f"images/sample_{row:06d}.png"
                plots.save_image(self._image(row), self.images / self.saved[row])
            entry["image"] = self.saved[row]
        return entry

    def _ids(self) -> Tensor:
        inputs = self.inputs
        return inputs["input_ids"] if isinstance(inputs, dict) else inputs

    def _tokens(self, row: int, end: int) -> Tensor:
        """Input row's token ids before position `end`, padding (attention_mask 0) left out:
        left-padded rows would show, and generate from, their pad tokens."""
        ids = self._ids()[row, :end]
        mask = self.inputs.get("attention_mask") if isinstance(self.inputs, dict) else None
        return ids if mask is None else ids[mask[row, :end].to(ids.device).bool()]

    def _prompt(self, s: int) -> Tensor:
        """Sample s's context up to and including its token, padding left out."""
        row, pos = (int(v) for v in self.positions[s])
        return self._tokens(row, pos + 1)

    def distinct_prompts(self, samples: list[int], n: int) -> list[int]:
        """The first n of `samples` whose prompts differ (a corpus repeats its lines)."""
        chosen: list[int] = []
        seen: set[tuple[int, ...]] = set()
        for s in samples:
            key = tuple(self._prompt(s).tolist())
            if key not in seen and len(chosen) < n:
                seen.add(key)
                chosen.append(s)
        return chosen

    def continuations(self, decomposition: Decomposition, s: int, k: int) -> dict[str, Any]:
        """Greedy continuations of sample s's context (up to and including its token) at
        W0 - δ v_k, W0 and W0 + δ v_k (per-token LM samples with a tokenizer only)."""
        ids = self._prompt(s)
        delta, n_new = self.generation
        pad = getattr(self.tokenizer, "pad_token_id", None)

        def text(k_: int | None, d: float) -> str:
            return self.tokenizer.decode(generate_ids(decomposition, ids, k_, d, n_new, pad))

        if s not in self.at_w0:
            self.at_w0[s] = text(None, 0.0)
        return {
            "sample": s,
            "prompt": self.tokenizer.decode(ids.tolist()),
            "delta": delta,
            "minus": text(k, -delta),
            "zero": self.at_w0[s],
            "plus": text(k, delta),
        }

    def _image(self, row: int) -> Tensor:
        """Input `row` of an image batch (`images` is set only for one, a tensor)."""
        return cast(Tensor, self.inputs)[row]

    def output(self, i: int) -> str:
        """The name of output i: its token for a language model, else its class name."""
        if self.tokenizer is not None and self.per_token:
            return hf.token_text(self.tokenizer, i)
        return _name(i, self.class_names)

    def grid(self, k: int, top: Tensor, samples: list[dict], p_active: float) -> str:
        """Subnetwork k's top images in one figure; returns its path in the analysis folder."""
        assert self.images is not None
        path = f"grids/subnetwork_{k:03d}.png"
        plots.plot_image_grid(
            [self._image(int(self.positions[s, 0])) for s in top.tolist()],
            [f"{e['label'] or ''} {e['impact']:.2g}".strip() for e in samples],
            self.images / path,
            f"subnetwork {k}: P_act {p_active:.3f}",
        )
        return path


class InterventionResult(BaseModel):
    """What `l3d intervene` writes per subnetwork: the output change of every sample (rows of
    `change`, one per δ) beside its impact; read back through `read_intervention`."""

    subnetwork: NonNegativeInt
    divergence: str
    deltas: list[float] = Field(min_length=1)
    impact: list[float]
    change: list[list[float]]
    noise_floor: float = 0.0  # absent before l3d measured it

    @model_validator(mode="after")
    def _aligned(self) -> InterventionResult:
        if len(self.change) != len(self.deltas) or any(
            len(row) != len(self.impact) for row in self.change
        ):
            raise ValueError("needs one row of changes per δ, one change per sample of 'impact'")
        return self


def read_intervention(path: Path, n_v: int) -> dict[str, Any]:
    """An intervention result of a decomposition with `n_v` subnetworks, validated."""
    fix = "delete it and run `l3d intervene` again"
    result = io.validated(io.read_json(path, "intervention result"), InterventionResult, path, fix)
    if result.subnetwork >= n_v:
        raise L3DError(f"{path}: subnetwork {result.subnetwork} is not one of 0..{n_v - 1}: {fix}")
    return result.model_dump()


class _Summary(BaseModel):
    n_subnetworks: NonNegativeInt
    n_dead: NonNegativeInt
    n_samples: NonNegativeInt
    n_top: NonNegativeInt
    n_references: NonNegativeInt
    pairs: bool = False
    data: str | None = None
    loss_pooled_squared: float | None = None
    median_intervention_selectivity: float | None = None
    purity: float | None = None


class _Record(BaseModel):
    index: NonNegativeInt


class AnalysisIndex(BaseModel):
    """The parts of analysis.json that readers index by: the summary's subnetwork count and one
    record per subnetwork (the rest is read as written)."""

    summary: _Summary
    subnetworks: list[_Record]


def read_analysis(path: Path, n_v: int, fix: str) -> dict[str, Any]:
    """analysis.json of a decomposition with `n_v` subnetworks, checked: an edited or stale file
    would show some subnetworks without their numbers."""
    analysis = io.read_json(path, "analysis")
    index = io.validated(analysis, AnalysisIndex, path, fix)
    if index.summary.n_subnetworks != n_v or sorted(r.index for r in index.subnetworks) != list(
        range(n_v)
    ):
        raise L3DError(f"{path}: its records are not one per subnetwork 0..{n_v - 1}: {fix}")
    return analysis


def _intervention_record(effect: InterventionEffect) -> dict[str, Any]:
    return {
        "delta": effect.delta,
        "top_samples": {"minus": effect.top[0], "plus": effect.top[1]},
        "random_samples": {"minus": effect.random[0], "plus": effect.random[1]},
        "noise_floor": effect.noise_floor,
        "below_noise": effect.below_noise,
        "selectivity": effect.selectivity,
    }


# Unicode categories shown escaped: control, format (a right-to-left override reverses the text
# after it, a zero-width space shows as nothing), surrogate, line and paragraph separators.
HIDDEN = ("Cc", "Cf", "Cs", "Zl", "Zp")


def escape_hidden(text: str) -> str:
    """`text` with every character that would not show as itself escaped, e.g. \\x0b, \\u202e."""
    return "".join(_escaped(c) if unicodedata.category(c) in HIDDEN else c for c in text)


def _escaped(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _cell(text: str, code: bool = False) -> str:
    """Text for analysis.md: in a table cell, HTML-escaped (a token '<script>' or '&amp;' is
    shown as written, not rendered); in a code span (`code`) as it is, which Markdown shows
    literally."""
    text = escape_hidden(text.replace("\n", "⏎")).replace("|", "\\|").replace("`", "'")
    return text if code else html.escape(text, quote=False)


def _markdown(result: dict, is_image: bool) -> str:
    s = result["summary"]
    lines = [
        "# Subnetwork analysis",
        "",
        f"{s['n_subnetworks']} subnetworks ({s['n_dead']} dead) on {s['n_samples']} samples; "
        + (
            "contrastive pairs: impact with each input's counterpart as reference, patching "
            "score: the fraction of the pairs' mean divergence the best step along a subnetwork "
            "closes (steps in [-2, 2] x ‖W0‖)."
            if s.get("pairs")
            else f"impact averaged over {s['n_references']} references."
        )
        + " Reconstruction loss: "
        f"{s['loss_paper']:.4f} (paper), {s['loss_pooled_squared']:.4f} (pooled squared).",
        "",
    ]
    if "purity" in s:
        lines += [
            f"Top-{s['n_top']} sample purity (share of the most common label), mean over live "
            f"subnetworks: **{s['purity']:.3f}**"
            + (
                f"; random directions of the same ranks: {s['purity_random_directions']:.3f}"
                if "purity_random_directions" in s
                else ""
            )
            + f"; most common label overall: {s['majority_label_fraction']:.3f}.",
            "",
        ]
    n_live = s["n_subnetworks"] - s["n_dead"]
    median = s["median_intervention_selectivity"]
    lines += [
        f"Median intervention selectivity over {n_live - s['n_intervention_below_noise']} of "
        f"{n_live} live subnetworks: "
        + ("none measurable" if median is None else f"**{median:.3g}**")
        + f" (δ = ±{s['intervention_delta']:.3g}; {s['n_intervention_below_noise']} of {n_live} "
        "live below noise, not counted: their change on random samples is below the round-off "
        "floor).",
        "",
        "![P_act per subnetwork](p_active.png)",
        "",
    ]
    for r in result["subnetworks"]:
        flag = " — **dead**" if r["dead"] else ""
        purity = f", purity {r['purity']:.2f}" if "purity" in r else ""
        if "patching_score" in r:
            purity += f", patching score {r['patching_score']:.3f}"
        lines += [f"## Subnetwork {r['index']}: P_act {r['p_active']:.4f}{purity}{flag}", ""]
        if is_image and "grid" in r:
            lines += [f"![top images of subnetwork {r['index']}]({r['grid']})", ""]
        lines += ["| impact | sample | label |", "|---:|---|---|"]
        for e in r["top_samples"]:
            if e["token"] is not None:
                shown = f"{_cell(e['text'] or '')}**[{_cell(e['token'])}]**"
            elif e["image"] is not None:
                shown = f"![sample {e['sample']}]({e['image']})"
            else:
                shown = f"sample {e['sample']}"
            lines.append(f"| {e['impact']:.4g} | {shown} | {_cell(e['label'] or '')} |")
        what, change = s["derivative_label"], s["change_label"]
        up = ", ".join(
            f"`{_cell(t['label'], code=True)}` {t['value']:+.3g}"
            for t in r["top_logits"]["positive"]
        )
        down = ", ".join(
            f"`{_cell(t['label'], code=True)}` {t['value']:+.3g}"
            for t in r["top_logits"]["negative"]
        )
        i = r["intervention"]
        selectivity = (
            f"selectivity below noise: changes under the round-off floor {i['noise_floor']:.3g}"
            if i["below_noise"]
            else f"selectivity {i['selectivity']:.3g}"
        )
        lines += [
            "",
            f"Pushes up ({what}): {up}",
            "",
            f"Pushes down: {down}",
            "",
            f"Intervention δ = ±{i['delta']:.3g}: {change} on top samples "
            f"{i['top_samples']['minus']:.3g} / {i['top_samples']['plus']:.3g}, on random samples "
            f"{i['random_samples']['minus']:.3g} / {i['random_samples']['plus']:.3g} "
            f"({selectivity}).",
            "",
        ]
    return "\n".join(lines)
