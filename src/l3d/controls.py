"""Controls: is a decomposition evidence of learned structure? (docs/controls.md)

A random network decomposes too, often to a lower loss than the trained one (its gradients are
simpler), and a sparse input still touches only its own weights at any weights, so a low loss, a
high unit share or a selective intervention says little on its own. What counts is the gap to the
same decomposition of a network without the learned structure, and whether another seed finds the
same subnetworks. This module owns both:

- `shuffle_parameters_`: the control network for any model, each parameter tensor's entries
  permuted (the same architecture and weight statistics, the learned arrangement destroyed);
- `matched_cosines`: cross-seed stability, the Hungarian-matched |cos| of two sets of subnetworks;
- `compare`: each headline metric beside its control's, with the gaps too small to count flagged.

The toy experiments (l3d.experiments) also re-initialise the toy itself as a control; `l3d
control RUN_DIR` runs both controls for any run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from l3d import io
from l3d.core.subnetworks import Subnetworks
from l3d.decomposition import Decomposition
from l3d.errors import L3DError

SHUFFLE_SEED_OFFSET = 60_000
"""The shuffled control of a run with seed s permutes its weights with seed s + this."""
SMALL_GAP_SHARE = 0.1
"""A matched unit share (toys) within this of its control's is flagged."""
SMALL_GAP_SELECTIVITY = 2.0
"""An output selectivity less than this many times its control's is flagged."""
SMALL_GAP_PURITY = 0.1
"""A top-sample label purity within this of its control's is flagged."""
UNSTABLE_MMCS = 0.9
"""Cross-seed stability (mean matched |cos| of live subnetworks) below this is flagged."""


@torch.no_grad()
def shuffle_parameters_(model: nn.Module, seed: int) -> None:
    """Permute the entries of every floating-point parameter tensor of `model` in place, each with
    its own permutation drawn from `seed` (in the order of `named_parameters`)."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not p.is_floating_point():
            continue
        order = torch.randperm(p.numel(), generator=generator).to(p.device)
        p.copy_(p.flatten()[order].view_as(p))


def matched_cosines(a: Tensor, b: Tensor) -> list[float]:
    """|cos| between each row of `a` and the row of `b` it is matched to (Hungarian on |cos|),
    for the min(len(a), len(b)) matched rows of `a` in order. Sign-free: a subnetwork's sign is
    arbitrary. Two decompositions of one model from different seeds give 1.0 for every
    subnetwork when they find the same subnetworks in any order (cross-seed stability).

    a: (n_a, n_weights); b: (n_b, n_weights), e.g. flattened V_out directions."""
    return _matched(F.normalize(a, dim=1) @ F.normalize(b, dim=1).T)


def _matched(cos: Tensor) -> list[float]:
    """The Hungarian matching's |cos| of a (n_a, n_b) cosine matrix, in row order."""
    rows, cols = linear_sum_assignment(cos.abs().cpu().numpy(), maximize=True)
    return [float(cos[r, c].abs()) for r, c in zip(rows, cols)]


@torch.no_grad()
def subnetwork_cosines(a: Subnetworks, b: Subnetworks) -> Tensor:
    """cos(V_k of a, V_l of b) over all their tensors, (n_a, n_b), formed one tensor at a time
    (never the whole (n_v, n_weights) matrices of a large model)."""
    inner = torch.zeros(a.n_subnetworks, b.n_subnetworks, dtype=torch.float64)
    for fa, fb in zip(a.factors, b.factors):
        da, db = fa.materialize().flatten(1).double(), fb.materialize().flatten(1).double()
        inner += (da @ db.T).cpu()
    norms_a = a.sq_norms().double().cpu().clamp_min(1e-30).sqrt()
    norms_b = b.sq_norms().double().cpu().clamp_min(1e-30).sqrt()
    return inner / norms_a[:, None] / norms_b[None, :]


def stability(first: Tensor, second: Tensor) -> dict[str, Any]:
    """Cross-seed stability of two decompositions' live subnetworks, each (n_live, n_weights):
    their matched |cos|, its mean (the peers' MMCS between runs) and minimum."""
    return _stability(matched_cosines(first, second))


def decomposition_stability(first: Decomposition, second: Decomposition) -> dict[str, Any]:
    """`stability` of two decompositions of one model (live subnetworks of V_out)."""
    if first.subnetworks.v_out.names != second.subnetworks.v_out.names:
        raise L3DError("the two decompositions cover different parameter tensors")
    cos = subnetwork_cosines(first.subnetworks.v_out, second.subnetworks.v_out)
    live_a, live_b = first.p_active.cpu() > 0, second.p_active.cpu() > 0
    return _stability(_matched(cos[live_a][:, live_b]))


def _stability(cosines: list[float]) -> dict[str, Any]:
    return {
        "matched_cosines": cosines,
        "mmcs": sum(cosines) / len(cosines) if cosines else float("nan"),
        "min": min(cosines, default=float("nan")),
        "flagged": not cosines or sum(cosines) / len(cosines) < UNSTABLE_MMCS,
    }


class _Compared(BaseModel):
    metric: str
    value: float
    control: float
    kind: Literal["shown", "ratio", "difference"]
    gap: float | None = None
    flagged: bool


class _Shuffled(BaseModel):
    folder: str | None = None
    metrics: dict[str, float | None] = {}
    comparison: list[_Compared]


class _Seed(BaseModel):
    folder: str | None = None
    second_seed: int
    matched_cosines: list[float] = []
    mmcs: float
    min: float
    flagged: bool


class ControlsResult(BaseModel):
    """controls.json as `l3d control` writes it; read through `read_controls`."""

    run: dict[str, float | None] = {}
    shuffled: _Shuffled | None = None
    seed: _Seed | None = None


def read_controls(path: Path) -> dict[str, Any]:
    """controls.json, validated, or an L3DError naming the file and the field."""
    fix = "delete it and run `l3d control` again"
    return io.validated(io.read_json(path, "controls"), ControlsResult, path, fix).model_dump()


# How each headline metric is compared with its control: "higher" metrics must exceed the
# control's by the margin ("difference") or factor ("ratio"); the loss is shown, never flagged (a
# random network's is often lower).
METRICS: dict[str, tuple[str, float | None]] = {
    "loss_pooled_squared": ("shown", None),
    "live_subnetworks": ("shown", None),
    "median_intervention_selectivity": ("ratio", SMALL_GAP_SELECTIVITY),
    "purity": ("difference", SMALL_GAP_PURITY),
    "mean_matched_share": ("difference", SMALL_GAP_SHARE),
}


def headline(analysis_summary: dict[str, Any]) -> dict[str, float | None]:
    """The metrics `compare` reads, from an analysis summary (`write_analysis`)."""
    return {
        "loss_pooled_squared": analysis_summary.get("loss_pooled_squared"),
        "median_intervention_selectivity": analysis_summary.get("median_intervention_selectivity"),
        "purity": analysis_summary.get("purity"),
        "live_subnetworks": analysis_summary["n_subnetworks"] - analysis_summary["n_dead"],
    }


def compare(mine: dict[str, float | None], control: dict[str, float | None]) -> list[dict]:
    """One row per metric present in both: the value, the control's, the gap (difference or
    ratio, as METRICS says) and whether it is too small to count as evidence."""
    rows = []
    for name, (kind, margin) in METRICS.items():
        a, b = mine.get(name), control.get(name)
        if a is None or b is None:
            continue
        row: dict[str, Any] = {"metric": name, "value": a, "control": b, "kind": kind}
        if kind == "ratio":
            row["gap"] = a / max(b, 1e-12)
        elif kind == "difference":
            row["gap"] = a - b
        row["flagged"] = margin is not None and row["gap"] < margin
        rows.append(row)
    return rows


def shuffled_entry(
    mine: dict[str, float | None], control_summary: dict[str, Any], folder: str | None
) -> dict[str, Any]:
    """controls.json's "shuffled": the control's headline metrics (from its analysis summary)
    and their comparison with the run's `mine`."""
    theirs = headline(control_summary)
    return {"folder": folder, "metrics": theirs, "comparison": compare(mine, theirs)}


def seed_entry(first: Decomposition, second: Decomposition, folder: str | None) -> dict[str, Any]:
    """controls.json's "seed": the second decomposition's seed and the two's stability."""
    return {
        "folder": folder,
        "second_seed": second.config.seed,
        **decomposition_stability(first, second),
    }


LABELS = {
    "loss_pooled_squared": "loss (pooled squared)",
    "live_subnetworks": "live subnetworks",
    "median_intervention_selectivity": "median intervention selectivity",
    "purity": "top-sample label purity",
    "mean_matched_share": "mean matched unit share",
}


def where(control: dict[str, Any]) -> str:
    """', in FOLDER' for a control saved as a run folder, else ''."""
    return f", in {control['folder']}" if control.get("folder") else ""


def markdown(result: dict[str, Any]) -> str:
    """`l3d control`'s result (controls.json) as Markdown: the comparison table, then stability."""
    lines = ["# Controls", ""]
    shuffled = result.get("shuffled")
    if shuffled is not None:
        lines += [
            "The same decomposition of the model with every parameter tensor's entries shuffled"
            f"{where(shuffled)}. A gap too small to count as evidence of learned structure "
            "is flagged; the loss is shown only (a random network's is often lower).",
            "",
            "| metric | run | shuffled control | gap | |",
            "|---|---:|---:|---:|---|",
        ]
        for row in shuffled["comparison"]:
            gap, ratio = row.get("gap"), row["kind"] == "ratio"
            shown = "" if gap is None else (f"x{gap:.3g}" if ratio else f"{gap:+.3g}")
            flag = "**small gap**" if row["flagged"] else ""
            label = LABELS.get(row["metric"], row["metric"])
            value, control = f"{row['value']:.4g}", f"{row['control']:.4g}"
            lines.append(f"| {label} | {value} | {control} | {shown} | {flag} |")
        lines.append("")
    seed = result.get("seed")
    if seed is not None:
        flag = " **(unstable)**" if seed["flagged"] else ""
        lines += [
            f"Cross-seed stability (seed {seed['second_seed']}{where(seed)}): mean matched "
            f"|cos| of live subnetworks {seed['mmcs']:.3f}, minimum {seed['min']:.3f} over "
            f"{len(seed['matched_cosines'])} matched{flag}; 1.0 means the same subnetworks.",
            "",
        ]
    return "\n".join(lines)
