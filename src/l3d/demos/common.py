"""What every demo does after training its model: decompose, save, analyse, summarise."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from l3d.config import L3DConfig
from l3d.core.samples import Inputs
from l3d.decomposition import Decomposition, run

ANALYSIS_SUMMARY = (
    "loss_paper",
    "loss_pooled_squared",
    "n_dead",
    "purity",
    "purity_random_directions",
    "majority_label_fraction",
)
"""The analysis summary's fields that each demo's summary.json repeats."""


def decompose_and_analyze(
    model: nn.Module,
    data: Inputs,
    config: L3DConfig,
    out: Path,
    *,
    n_top: int,
    n_references: int,
    tokenizer: Any = None,
    labels: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[Decomposition, dict, dict]:
    """Decompose, save to out/decomposition, analyse into out/analysis (l3d.analysis, seeded by
    the config); returns the decomposition, the analysis and the summary fields the demos share
    (parameter count, seconds, losses, purity)."""
    from l3d.analysis import AnalysisOptions, write_analysis  # plotting: only when a demo runs

    start = time.perf_counter()
    decomposition = run(model, data, config)
    l3d_seconds = time.perf_counter() - start
    decomposition.save(out / "decomposition")
    start = time.perf_counter()
    options = AnalysisOptions(n_top=n_top, n_references=n_references, seed=config.seed)
    analysis = write_analysis(
        decomposition,
        data,
        out / "analysis",
        tokenizer=tokenizer,
        labels=labels,
        class_names=class_names,
        options=options,
    )
    fields = {
        "n_parameters": sum(w.numel() for w in decomposition.target.w0.values()),
        "l3d_seconds": l3d_seconds,
        "seconds_per_step": l3d_seconds / max(decomposition.history[-1]["step"], 1),
        "analysis_seconds": time.perf_counter() - start,
        **{k: analysis["summary"][k] for k in ANALYSIS_SUMMARY},
    }
    return decomposition, analysis, fields
