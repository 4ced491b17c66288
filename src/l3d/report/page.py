"""Writes the report folder: index.html, subnetworks/K.html per subnetwork, and img/ beside
them. One page per subnetwork keeps the index small for runs of a thousand subnetworks:
opening it loads one table, and a subnetwork's examples and heatmaps load when its page opens."""

from __future__ import annotations

import shutil
from pathlib import Path

from l3d import io
from l3d.report import data as run_data
from l3d.report.html import Assets, fmt
from l3d.report.index import write_index
from l3d.report.subnetwork import write_page
from l3d.runs.folder import RunDir, writable_folder


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report/ (or OUT/): index.html and one page per subnetwork; returns the
    index page."""
    data = run_data.load(Path(run_dir))
    out = writable_folder(Path(out) if out is not None else data.run.report, "report")
    for stale in ("img", "assets", "subnetworks"):  # assets/: reports of earlier versions
        shutil.rmtree(out / stale, ignore_errors=True)
    assets = Assets(out)
    cosine = run_data.vout_cosine(data.v_out)
    coactive = units = None
    if data.impact is not None:
        coactive = run_data.coactivation(data.impact)
        if data.units is not None and data.samples is not None:
            units = run_data.matched_units(data.impact, data.samples.inputs, data.units)
    pages = out / "subnetworks"
    pages.mkdir()
    for k in range(data.n_v):
        html = write_page(data, k, cosine, coactive, units, assets)
        (pages / f"{k}.html").write_text(html)  # a fresh folder: no reader sees half a page
    index = out / "index.html"
    io.write_text(index, write_index(data, coactive, units, assets))
    return index


def headline(run_dir: str | Path) -> str:
    """The numbers to read first, for the terminal: subnetworks, dead, losses, selectivity."""
    run = RunDir(Path(run_dir))
    saved = io.read_decomposition(run.decomposition)
    ev = saved.meta["evaluation"]
    parts = [
        f"{saved.config.n_subnetworks} subnetworks, {int((saved.p_active == 0).sum())} dead",
        f"loss {fmt(ev['loss_paper'])} (eq. 8), {fmt(ev['loss_pooled_squared'])} (pooled squared)",
    ]
    analysis = run.analysis / "analysis.json"
    if analysis.is_file():
        median = io.read_json(analysis, "analysis")["summary"].get(
            "median_intervention_selectivity"
        )
        parts.append(
            "median selectivity "
            + ("not measurable (below noise)" if median is None else f"{fmt(median)}×")
        )
    return ", ".join(parts)
