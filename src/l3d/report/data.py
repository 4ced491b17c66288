"""What the report reads from a run folder, and the numbers it derives from it.

The saved factors and P_act come from `decomposition/` (no model is built); per-sample numbers
from the analysis (`analysis.json` and the full impact matrix in `impact.safetensors`); the inputs
themselves are rebuilt from the run's config (toy data, a data file, tokenized text), so examples
show whole context windows and input vectors rather than sample numbers. Whatever cannot be read
becomes a note on the page saying how to get it, never a failed report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from l3d import hf, io, runs
from l3d.analysis.writing import escape_hidden, read_analysis, read_intervention
from l3d.config import L3DConfig
from l3d.controls import read_controls
from l3d.core.samples import as_inputs
from l3d.core.subnetworks import Subnetworks
from l3d.errors import L3DError
from l3d.finetuning import read_description
from l3d.runs.folder import RunDir
from l3d.toys import registry as toys

# Rows of the impact matrix used for the co-activation cosine: enough for two decimals, and a
# 100k-sample run costs 20k x n_v x n_v multiply-adds instead of 100k.
COACTIVE_MAX_ROWS = 20_000


@dataclass
class Samples:
    """The inputs behind the impact matrix's rows, as the pages show them."""

    kind: str
    """'text' (per-token ids), 'vector' (2-D), 'image' (N, C, H, W) or 'other'."""
    inputs: Any
    positions: np.ndarray
    """(n_samples, 2): each sample row's (input, position)."""
    ids: np.ndarray | None = None
    """text: (n_inputs, seq_len) token ids."""
    mask: np.ndarray | None = None
    """text: (n_inputs, seq_len) attention mask (1 = a real token)."""
    tokenizer: Any = None
    labels: list[str] | None = None
    """A label per sample row, named by class_names."""
    _rows: dict[int, np.ndarray] = field(default_factory=dict)
    _decoded: dict[int, str] = field(default_factory=dict)

    def samples_of_input(self, row: int) -> np.ndarray:
        """The sample rows of input `row`, in position order (text: one per valid token)."""
        if not self._rows:
            order = np.argsort(self.positions[:, 0], kind="stable")
            inputs = self.positions[order, 0]
            bounds = np.flatnonzero(np.diff(inputs)) + 1
            for chunk in np.split(order, bounds):
                self._rows[int(self.positions[chunk[0], 0])] = chunk
        return self._rows.get(row, np.zeros(0, dtype=np.int64))


@dataclass
class AdapterInfo:
    """A finetuning adapter saved inside the run folder (`l3d finetune RUN --out RUN/...`)."""

    path: Path
    """Its folder, relative to the run folder."""
    train: str
    subnetworks: list[int]
    alpha: list[float]
    """alpha per chosen subnetwork, from adapter.safetensors."""
    n_trainable: int
    history: list[dict[str, float]]
    """Per step: step, objective, retain_distance (with a retain term), loss."""
    delta_norms: dict[str, float]
    w0_norms: dict[str, float]
    """Empty for adapters saved before l3d kept them."""
    objective: str | None = None
    lr: float | None = None
    retain_weight: float | None = None
    """How it was trained (None for adapters saved before l3d recorded it, or without retain
    data for retain_weight)."""


@dataclass
class RunData:
    """Everything the pages show of one run folder."""

    run: RunDir
    config: L3DConfig
    meta: dict
    v_out: Subnetworks
    p_active: np.ndarray
    records: list[dict]
    analysis: dict
    impact: np.ndarray | None
    """(n_samples, n_v) from the analysis, or None without one."""
    samples: Samples | None
    interventions: dict[int, dict]
    units: np.ndarray | None = None
    """Toys: (n_units, n_features) bool, the ground-truth units."""
    notes: list[str] = field(default_factory=list)
    controls: dict | None = None
    """`l3d control`'s result (RUN_DIR/controls/controls.json), or None before it ran."""
    adapters: list[AdapterInfo] = field(default_factory=list)

    @property
    def n_v(self) -> int:
        return self.config.n_v

    @property
    def summary(self) -> dict:
        return self.analysis.get("summary", {})

    def entry(self, k: int) -> dict:
        return self._by_index.get(k, {})

    def __post_init__(self) -> None:
        self._by_index = {int(s["index"]): s for s in self.analysis.get("subnetworks", [])}


def load(run_dir: Path) -> RunData:
    run = RunDir(run_dir)
    if not run.finished:
        run.require()  # says what the folder is: missing, an experiment's, a saved decomposition
        raise L3DError(
            f"'{run.path}' has no finished decomposition: run or resume "
            f"`l3d decompose --resume {run.path}` first"
        )
    if run.config.is_file():  # a run folder, not a decomposition saved on its own
        run.check_settings()
    saved = io.read_decomposition(run.decomposition)
    notes: list[str] = []
    # A folder holding only a decomposition (no config.yaml) is reported from its factors alone.
    spec = run.spec() if run.config.is_file() else None
    analysis_file = run.analysis / "analysis.json"
    analysis = {}
    if analysis_file.is_file():
        fix = f"run `l3d analyze {run.path}` again"
        analysis = read_analysis(analysis_file, saved.config.n_v, fix)
    impact = positions = None
    impact_file = run.analysis / "impact.safetensors"
    if analysis and impact_file.is_file():
        tensors = io.load_tensors(impact_file, "analysis impact")
        # Column-major: every question about a subnetwork reads its column of the matrix.
        impact = np.asfortranarray(tensors["impact"].float().numpy())
        bad = ~np.isfinite(impact)
        if bad.any():  # a diverged run: histograms and rankings need numbers
            notes.append(f"{int(bad.sum())} impact values are not finite; they are shown as 0.")
            impact[bad] = 0.0
        positions = tensors["sample_positions"].numpy()
        if impact.shape[1] != saved.config.n_subnetworks:
            raise L3DError(
                f"{impact_file} has {impact.shape[1]} subnetworks, the decomposition "
                f"{saved.config.n_subnetworks}: the analysis is stale; run `l3d analyze "
                f"{run.path}` again"
            )
    elif not analysis:
        notes.append(
            f"No analysis yet, so no examples, impact histograms or logits: run `l3d analyze "
            f"{run.path}` (or `l3d report` without --no-analyze)."
        )
    interventions = {}
    for path in sorted(run.interventions.glob("subnetwork_*.json")):
        result = read_intervention(path, saved.config.n_v)
        interventions[result["subnetwork"]] = result
    controls_file = run.path / "controls" / "controls.json"
    data = RunData(
        controls=read_controls(controls_file) if controls_file.is_file() else None,
        adapters=_adapters(run.path, saved.config.n_v, notes),
        run=run,
        config=saved.config,
        meta=saved.meta,
        v_out=saved.subnetworks.v_out,
        p_active=saved.p_active.numpy(),
        records=run.metrics_records() or saved.meta["history"],
        analysis=analysis,
        impact=impact,
        samples=None,
        interventions=interventions,
        notes=notes,
    )
    if positions is not None and spec is not None:
        data.samples = _samples(run, spec, saved.config.per_token, positions, notes)
        if data.samples is not None:
            data.units = _toy_units(spec, data.samples)
    return data


def _adapters(run_dir: Path, n_v: int, notes: list[str]) -> list[AdapterInfo]:
    """The adapters saved one or two folders below the run folder (not in its controls' run
    folders) of a decomposition with `n_v` subnetworks; one that cannot be read, or that names
    subnetworks this run does not have, becomes a note."""
    files = [*run_dir.glob("*/adapter.json"), *run_dir.glob("*/*/adapter.json")]
    found = []
    for file in sorted(files):
        path = file.parent.relative_to(run_dir)
        if path.parts[0] == "controls":
            continue
        try:
            # Typed by the adapter's own schema: the pages format numbers and build links from it.
            meta = read_description(file)
            beyond = [k for k in meta.subnetworks if k >= n_v]
            if beyond:
                raise L3DError(
                    f"it moves subnetwork {beyond[0]}, and this run has subnetworks 0..{n_v - 1}: "
                    "it was made for another decomposition; re-create it with `l3d finetune`"
                )
            weights = io.load_tensors(file.parent / "adapter.safetensors", "adapter weights")
            adapter = AdapterInfo(
                path=path,
                train=meta.train,
                subnetworks=list(meta.subnetworks),
                alpha=weights["alpha"].float().tolist(),
                n_trainable=meta.n_trainable,
                history=[{k: float(v) for k, v in r.items()} for r in meta.history],
                delta_norms=dict(meta.delta_norms),
                w0_norms=dict(meta.w0_norms),
                **_trained_with(meta.trained_with),
            )
            keys = [set(r) for r in adapter.history]
            if len(adapter.alpha) != len(adapter.subnetworks) or any(
                {"step", "objective"} - k or k != keys[0] for k in keys
            ):
                raise ValueError
        except L3DError as err:  # a missing or unreadable file: the message names the fix
            notes.append(f"Adapter {path} not shown: {err}")
            continue
        except (KeyError, TypeError, ValueError, AttributeError):
            notes.append(
                f"Adapter {path} not shown: its adapter.json or adapter.safetensors is not what "
                "l3d saves; re-create it with `l3d finetune`."
            )
            continue
        found.append(adapter)
    return found


def _trained_with(trained_with: dict) -> dict:
    """The objective, lr and retain weight an adapter was trained with, typed (None where
    absent)."""
    if not trained_with:
        return {}
    weight = trained_with["retain_weight"]
    return {
        "objective": str(trained_with["objective"]),
        "lr": float(trained_with["lr"]),
        "retain_weight": None if weight is None else float(weight),
    }


def _samples(
    run: runs.RunDir, spec: runs.RunSpec, per_token: bool, positions: np.ndarray, notes: list[str]
) -> Samples | None:
    """The run's inputs rebuilt from its config, or None (with a note) when they cannot be (a
    data file replaced since the run would put other inputs beside the analysis's numbers)."""
    source = spec.data
    if source.pairs is not None:
        # The pairs' inputs alone: their counterparts' outputs (which need the model) are not shown.
        notes.append("Contrastive-pair run: each example is the input of a pair.")
        source = source.model_copy(update={"pairs": None})
    try:
        runs.check_data(run, spec.data, "restore it")
        inputs = as_inputs(runs.build_data(source, spec.model))
        labels = runs.build_labels(spec.data)
        tokenizer = None
        if per_token and spec.model.hf is not None:
            tokenizer = runs.load_tokenizer(spec.data.options.get("tokenizer", spec.model.hf))
    except (L3DError, OSError, ImportError, ValueError) as err:
        notes.append(
            f"The inputs could not be rebuilt from config.yaml ({err}): examples are "
            "shown by sample number."
        )
        return None
    n_inputs = int(positions[:, 0].max()) + 1 if len(positions) else 0
    samples = Samples(kind="other", inputs=inputs, positions=positions, tokenizer=tokenizer)
    if labels is not None:
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        # One label per sample row, or per input (then shared by the input's tokens).
        rows = np.arange(len(positions)) if len(labels) == len(positions) else positions[:, 0]
        if len(labels) == len(positions) or len(labels) >= n_inputs:
            samples.labels = [_name(labels[int(r)], spec.data.class_names) for r in rows]
    if per_token:
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] >= n_inputs:
            samples.kind = "text"
            samples.ids = ids.numpy()
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            samples.mask = mask.numpy() if mask is not None else np.ones_like(samples.ids)
    elif isinstance(inputs, torch.Tensor) and inputs.shape[0] >= n_inputs:
        if inputs.dim() == 2:
            samples.kind = "vector"
        elif inputs.dim() == 4 and inputs.shape[1] in (1, 3):
            samples.kind = "image"
    return samples


def _name(label: Any, names: list[str] | None) -> str:
    if names is not None and isinstance(label, int) and 0 <= label < len(names):
        return str(names[label])
    return str(label)


def _toy_units(spec: runs.RunSpec, samples: Samples) -> np.ndarray | None:
    """The ground-truth units of a toy's data, when the inputs are that toy's feature vectors."""
    toy = spec.data.toy
    if toy is None or samples.kind != "vector":
        return None
    units = toys.get_toy(toy).units.numpy()
    return units if units.shape[1] == samples.inputs.shape[1] else None


# Derived numbers -------------------------------------------------------------------------------


def vout_cosine(v_out: Subnetworks) -> np.ndarray:
    """(n_v, n_v) cosine similarity of the subnetworks' V_out, from the factors' Gram matrix
    (never the dense directions: those are n_v x n_w)."""
    with torch.no_grad():
        gram = v_out.gram().double()
    norm = gram.diagonal().clamp_min(1e-30).sqrt()
    return (gram / norm[:, None] / norm[None, :]).numpy()


def coactivation(impact: np.ndarray) -> np.ndarray:
    """(n_v, n_v) cosine of the impact columns: 1 when two subnetworks matter on exactly the same
    samples in the same proportions, 0 when never on the same sample. Impact is non-negative, so
    this needs no threshold for "active"."""
    step = max(1, -(-impact.shape[0] // COACTIVE_MAX_ROWS))
    x = impact[::step].astype(np.float64)
    norm = np.sqrt((x**2).sum(0)).clip(1e-30)
    return (x.T @ x) / norm[:, None] / norm[None, :]


def matched_units(
    impact: np.ndarray, inputs: torch.Tensor, units: np.ndarray
) -> list[tuple[int, float]]:
    """Per subnetwork: the ground-truth unit whose single-unit samples (all active features in that
    unit) it has the largest mean impact on, and that unit's share of its mean impacts over
    units (1 = it matters on this unit's samples only)."""
    active = inputs.numpy() != 0
    means = []
    for unit in units:
        single = active.any(1) & ~(active & ~unit).any(1)
        means.append(impact[single].mean(0) if single.any() else np.zeros(impact.shape[1]))
    table = np.stack(means)  # (n_units, n_v)
    best = table.argmax(0)
    total = table.sum(0).clip(1e-30)
    return [(int(u), float(table[u, k] / total[k])) for k, u in enumerate(best)]


def unit_name(units: np.ndarray, u: int) -> str:
    features = np.flatnonzero(units[u]).tolist()
    if len(features) == 1:
        return f"feature {features[0]}"
    return f"unit {u} (features {', '.join(map(str, features))})"


def top_rows(column: np.ndarray, n: int) -> np.ndarray:
    """The n sample rows of largest impact, largest first (stable for ties)."""
    n = min(n, column.size)
    part = np.argpartition(-column, n - 1)[:n] if n < column.size else np.arange(column.size)
    return part[np.argsort(-column[part], kind="stable")]


# Bands of rank among the samples with non-zero impact, as SAE dashboards show activation
# quantiles: what a subnetwork does on typical, not only extreme, samples.
QUANTILE_BANDS = ((0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 1.0))


def quantile_examples(
    column: np.ndarray, per_band: int, skip: set[int]
) -> list[tuple[str, list[int]]]:
    """Per band, `per_band` sample rows evenly spaced through it (deterministic), leaving out
    rows in `skip` (already shown as top examples)."""
    nonzero = np.flatnonzero(column > 0)
    order = nonzero[np.argsort(-column[nonzero], kind="stable")]
    bands = []
    for lo, hi in QUANTILE_BANDS:
        band = [int(r) for r in order[int(lo * len(order)) : max(int(hi * len(order)), 1)]]
        band = [r for r in band if r not in skip]
        if not band:
            continue
        picks = np.linspace(0, len(band) - 1, min(per_band, len(band))).round().astype(int)
        label = (
            f"top {100 * lo:g}–{100 * hi:g} % by impact (of {len(order)} samples with impact > 0)"
        )
        bands.append((label, [band[i] for i in sorted(set(picks.tolist()))]))
    return bands


def top_terms(data: RunData, rows: np.ndarray, n: int = 5) -> list[str]:
    """What a subnetwork's top samples share, for the index and its search: their most common
    tokens (text), labels, or most active input features (vectors)."""
    samples = data.samples
    if samples is None or rows.size == 0:
        return []
    if samples.kind == "text":
        assert samples.ids is not None
        pos = samples.positions[rows]
        ids = samples.ids[pos[:, 0], pos[:, 1]].tolist()
        return [token_text(samples, i) for i, _ in Counter(ids).most_common(n)]
    if samples.labels is not None:
        return [label for label, _ in Counter(samples.labels[r] for r in rows).most_common(n)]
    if samples.kind == "vector":
        x = np.abs(samples.inputs[samples.positions[rows, 0]].numpy()).mean(0)
        order = np.argsort(-x, kind="stable")[:n]
        return [f"f{j}" for j in order.tolist() if x[j] > 0]
    return []


def token_text(samples: Samples, token_id: int) -> str:
    """A token as the pages show it: decoded alone (`hf.token_text`: byte fragments as their
    bytes); whitespace made visible (· ↵ →), an empty
    decoding as ∅, an id outside the tokenizer's vocabulary (or no tokenizer) as ⟨id⟩."""
    tokenizer = samples.tokenizer
    if tokenizer is None:
        return f"⟨{token_id}⟩"
    if token_id not in samples._decoded:
        try:
            in_vocab = 0 <= token_id < len(tokenizer)
            text = hf.token_text(tokenizer, token_id) if in_vocab else None
        except (TypeError, ValueError, IndexError, OverflowError):
            text = None
        samples._decoded[token_id] = f"⟨{token_id}⟩" if text is None else visible(text)
    return samples._decoded[token_id]


def visible(text: str) -> str:
    """A token or output name that never shows as a blank: ∅ when empty, spaces as · when it is
    only whitespace, newlines and tabs as ↵ and →, other control characters (vertical tab, form
    feed, ...) and format characters (a right-to-left override would reverse the page's text
    after it; a zero-width space shows as nothing) as their escape, e.g. \\x0b, \\u202e."""
    if text == "":
        return "∅"
    if not text.strip():
        text = text.replace(" ", "·")
    text = text.replace("\n", "↵").replace("\t", "→")
    return escape_hidden(text)
