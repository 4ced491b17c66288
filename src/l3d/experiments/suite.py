"""Every toy experiment over the same seeds, summarised in one results table (Markdown + JSON)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from l3d.errors import L3DError
from l3d.experiments.registry import EXPERIMENTS
from l3d.experiments.runner import (
    Settings,
    fmt,
    parse_overrides,
    parse_seeds,
    run_experiment,
)
from l3d.io import write_json, write_text
from l3d.runs.folder import writable_folder

SUITE_ORDER = ("tms", "tms40", "tmcs", "higher_rank", "squares", "squares_wide", "resid_mlp")


def run_suite(
    out_dir: str | Path,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    *,
    quick: bool = False,
    settings: Settings = "improved",
    experiments: tuple[str, ...] = SUITE_ORDER,
    progress: bool = True,
    controls: bool = True,
) -> dict:
    """Run each experiment into out_dir/NAME and write out_dir/results.md and results.json;
    controls: the random-network control and cross-seed stability of each (first seed)."""
    out_dir = writable_folder(out_dir, "experiment output")
    summaries, seconds = {}, {}
    for name in experiments:
        start = time.perf_counter()
        report = run_experiment(
            name,
            seeds,
            out_dir / name,
            settings=settings,
            quick=quick,
            progress=progress,
            controls=controls,
        )
        seconds[name] = time.perf_counter() - start
        summaries[name] = report["summary"]
    table = results_table(summaries, seconds)
    write_text(out_dir / "results.md", table)
    result: dict[str, Any] = {"settings": settings, "seeds": list(seeds), "quick": quick}
    result |= {"summaries": summaries, "seconds": seconds}
    write_json(out_dir / "results.json", result)
    return result


def run_named(
    name: str,
    seeds: str,
    out_dir: str | Path | None = None,
    *,
    settings: Settings | None = None,
    quick: bool = False,
    sweep: bool = True,
    progress: bool = True,
    set_options: list[str] | tuple[str, ...] = (),
    controls: bool = True,
) -> Path:
    """What both experiment commands run: experiment `name`, or every one for 'suite' / 'all',
    from command-line values (seeds '0,1,2', `--set KEY=VALUE` options); returns the Markdown
    summary it wrote. Default settings: the paper's for one experiment, improved for the suite."""
    seed_list, overrides = parse_seeds(seeds), parse_overrides(list(set_options))
    out = Path(out_dir) if out_dir else Path("runs") / "experiments" / name
    if name in ("suite", "all"):
        if overrides:
            raise L3DError("--set applies to one experiment, not the suite")
        run_suite(
            out,
            seed_list,
            quick=quick,
            settings=settings or "improved",
            progress=progress,
            controls=controls,
        )
        return out / "results.md"
    run_experiment(
        name,
        seed_list,
        out,
        settings=settings or "paper",
        quick=quick,
        sweep=sweep,
        progress=progress,
        overrides=overrides,
        controls=controls,
    )
    return out / "summary.md"


def results_table(summaries: dict, seconds: dict) -> str:
    """One row per experiment: paper number beside ours (mean ± std over seeds)."""
    lines = [
        "| experiment | pooled sq. loss (ours) | paper | loss eq. 8 | units recovered | "
        "seeds all recovered | Pearson r (paper 0.92) | MMCS | probe errors @0.1 | "
        "output selectivity δ=0.25 | sample selectivity δ=1 | ablation ratio | "
        "units at share > 0.9 | hand-set solution: loss, share > 0.9, probe errors, r | "
        "random-network control: share, selectivity | cross-seed MMCS | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        paper = s["paper"].get("loss_pooled_squared", "-")
        # output j's change over the other outputs' (toys whose unit j owns output j)
        output_key = "selectivity_outputs_active_median_ratio_delta0.25"
        output = fmt(s[output_key], 1) if output_key in s else "-"
        stable = f"{s['stability']['mmcs']:.3f}" if "stability" in s else "-"
        lines.append(
            f"| {name} | {fmt(s['loss_pooled_squared'])} | {paper} | {fmt(s['loss_paper'])} | "
            f"{fmt(s['units_recovered'], 1)} / {s['n_units']} | "
            f"{s['seeds_all_recovered']}/{len(s['seeds'])} | "
            f"{fmt(s['pearson_r']) if 'pearson_r' in s else '-'} | "
            f"{fmt(s['mmcs']) if 'mmcs' in s else '-'} | "
            f"{fmt(s['probe_errors_0.1'], 1)} | {output} | "
            f"{fmt(s['selectivity_median_ratio_delta1'], 1)} | "
            f"{fmt(s['ablation_ratio_delta0.5'], 1)} | "
            f"{fmt(s['units_recovered_at_0.9'], 1)} | {_hand_set_cell(s)} | "
            f"{_control_cell(s)} | {stable} | "
            f"{seconds[name]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _hand_set_cell(summary: dict) -> str:
    """The hand-set solution's loss, units at share > 0.9, probe errors (and r)."""
    if "hand_set" not in summary:
        return "-"
    h = summary["hand_set"]
    r = f", r = {fmt(h['pearson_r'])}" if "pearson_r" in h else ""
    return (
        f"{fmt(h['loss_pooled_squared'])}, {fmt(h['units_recovered_at_0.9'], 1)}, "
        f"{fmt(h['probe_errors_0.1'], 1)}{r}"
    )


def _control_cell(summary: dict) -> str:
    """Trained vs random-network mean matched share and selectivity, flagged when the gap is
    small."""
    if "control" not in summary:
        return "-"
    c = summary["control"]
    flag = " (small gap)" if c["small_gaps"] else ""
    return (
        f"{c['trained']['mean_matched_share']:.2f} vs {c['control']['mean_matched_share']:.2f}, "
        f"{c['trained']['selectivity_median_ratio_delta1']:.1f} vs "
        f"{c['control']['selectivity_median_ratio_delta1']:.1f}{flag}"
    )


__all__ = ["EXPERIMENTS", "run_named", "run_suite"]
