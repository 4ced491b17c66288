"""Builds the report page. All text from data, tokenizers and configs passes through `_e`
(html.escape), and the page's only script is the fixed one below, allowed by its hash in the
Content-Security-Policy: a `<script>` inside a dataset line shows as text and cannot run."""

from __future__ import annotations

import base64
import hashlib
import html
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
import yaml

from l3d import io, plots
from l3d.config import L3DConfig
from l3d.core.subnetworks import Subnetworks
from l3d.errors import L3DError
from l3d.report.heatmaps import as_matrix, heatmap_png, pool_max_abs
from l3d.runs.folder import RunDir, writable_folder
from l3d.runs.spec import yaml_error

# Samples counted as "most affected" when an intervention's selectivity is summarised.
N_TOP_INTERVENTION = 10

_SCRIPT = """
const list = document.getElementById("nav-list");
const main = document.getElementById("subnetworks");
function sortBy(key, descending) {
  const items = Array.from(list.children);
  const sections = Array.from(main.querySelectorAll("section.subnetwork"));
  const value = (el) => parseFloat(el.dataset[key]);
  const order = (a, b) => (descending ? value(b) - value(a) : value(a) - value(b));
  items.sort(order).forEach((el) => list.appendChild(el));
  sections.sort(order).forEach((el) => main.appendChild(el));
}
document.getElementById("sort").addEventListener("change", (event) => {
  const [key, direction] = event.target.value.split(":");
  sortBy(key, direction === "desc");
});
document.getElementById("hide-dead").addEventListener("change", (event) => {
  document.body.classList.toggle("hide-dead", event.target.checked);
});
sortBy("pActive", true);
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
nav { position: fixed; top: 0; bottom: 0; left: 0; width: 15rem; overflow-y: auto;
      background: #f4f4f6; padding: 0.8rem; box-sizing: border-box; font-size: 0.9rem; }
nav ol { list-style: none; padding: 0; margin: 0.5rem 0; }
nav li a { display: flex; justify-content: space-between; padding: 0.1rem 0.3rem;
           text-decoration: none; color: inherit; }
nav li a:hover { background: #e2e2ea; }
main { margin-left: 15rem; padding: 1rem 2rem; max-width: 70rem; }
section { border-top: 1px solid #ccc; padding: 0.5rem 0 1rem; }
.dead { color: #a33; }
body.hide-dead .is-dead { display: none; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start;
            margin-bottom: 1rem; }
.heatmaps figure { margin: 0; }
.heatmaps img { image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.8rem; color: #555; }
.samples { font-family: ui-monospace, monospace; font-size: 0.85rem; white-space: pre-wrap; }
.samples li { margin: 0.2rem 0; }
mark { background: #ffd54f; }
.grid { display: flex; flex-wrap: wrap; gap: 0.5rem; }
.grid figure { margin: 0; text-align: center; }
.grid img { width: 5rem; height: 5rem; object-fit: contain; image-rendering: pixelated; }
table { border-collapse: collapse; font-size: 0.9rem; }
td, th { border: 1px solid #ddd; padding: 0.15rem 0.5rem; text-align: left; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; }
.logits { display: flex; gap: 2rem; }
.pos { color: #1a5e1a; } .neg { color: #8b1a1a; }
"""


def _e(value: object) -> str:
    """HTML-escape anything shown on the page (data, tokens, labels, config values)."""
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _load_v_out(run_dir: RunDir) -> tuple[L3DConfig, dict, Subnetworks, np.ndarray]:
    """The saved V_out factors and P_act, read without building the model."""
    if not run_dir.finished:
        raise L3DError(
            f"'{run_dir.path}' has no finished decomposition: run or resume "
            f"`l3d decompose --resume {run_dir.path}` first"
        )
    try:
        saved = io.read_decomposition(run_dir.decomposition)
    except yaml.YAMLError as err:  # a hand-edited decomposition/config.yaml
        raise yaml_error(run_dir.decomposition / "config.yaml", err) from None
    return saved.config, saved.meta, saved.subnetworks.v_out, saved.p_active.numpy()


class _Assets:
    """Images written beside index.html, referenced by relative URLs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / "img").mkdir(parents=True, exist_ok=True)

    def png(self, name: str, data: bytes) -> str:
        io.write_bytes(self.out / "img" / name, data)
        return f"img/{quote(name)}"

    def copy(self, source_root: Path, relative: str) -> str | None:
        """Copy an analysis image into assets/; paths that leave the analysis folder are refused."""
        root = source_root.resolve()
        source = (root / relative).resolve()
        if not source.is_relative_to(root) or not source.is_file():
            return None
        target = self.out / "assets" / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return "assets/" + quote(source.relative_to(root).as_posix())


def _img(src: str, alt: str, size: tuple[int, int] | None = None) -> str:
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return f'<img src="{_e(src)}" alt="{_e(alt)}"{dims} loading="lazy">'


def _heatmaps(v_out: Subnetworks, k: int, assets: _Assets) -> str:
    with torch.no_grad():
        dense = {n: d.numpy() for n, d in v_out.direction(k).items()}
    scale = max(float(np.abs(d).max()) for d in dense.values())
    shares = {n: float((d**2).sum()) for n, d in dense.items()}
    total = sum(shares.values()) or 1.0
    figures = []
    for i, (name, values) in enumerate(dense.items()):
        src = assets.png(f"v_out_{k}_{i}.png", heatmap_png(values, scale))
        rows, cols = pool_max_abs(as_matrix(values)).shape
        # Whole-pixel-ish blocks: the short side at least 48 px, the long side at most 480 px.
        zoom = min(max(48 / min(rows, cols), 1.0), 480 / max(rows, cols))
        shape = "×".join(str(s) for s in values.shape) or "scalar"
        caption = f"{name} ({shape}), {100 * shares[name] / total:.1f}% of ‖v‖²"
        size = (round(cols * zoom), round(rows * zoom))
        figures.append(
            f"<figure>{_img(src, f'V_out of subnetwork {k}, {name}', size)}"
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return (
        f"<h3>V_out per tensor</h3><p class=note>red +, blue −, shared scale ±{_fmt(scale)}</p>"
        f'<div class="heatmaps">{"".join(figures)}</div>'
    )


def _samples(entry: dict, analysis_dir: Path, assets: _Assets) -> str:
    samples = entry.get("top_samples") or []
    if not samples:
        return ""
    images = [s for s in samples if s.get("image")]
    if images:
        cells = []
        for s in images:
            src = assets.copy(analysis_dir, s["image"])
            label = f" {s['label']}" if s.get("label") is not None else ""
            caption = f"#{s['sample']}{label} · {_fmt(s['impact'])}"
            picture = _img(src, f"sample {s['sample']}") if src else "(image missing)"
            cells.append(f"<figure>{picture}<figcaption>{_e(caption)}</figcaption></figure>")
        return f'<h3>Top samples by impact</h3><div class="grid">{"".join(cells)}</div>'
    rows = []
    for s in samples:
        if s.get("text") is not None or s.get("token") is not None:
            body = f"{_e(s.get('text') or '')}<mark>{_e(s.get('token') or '')}</mark>"
        else:
            body = f"sample {_e(s['sample'])}"
        label = f" [{_e(s['label'])}]" if s.get("label") is not None else ""
        rows.append(
            f"<li><span class=impact>{_fmt(s['impact'])}</span> · #{_e(s['sample'])}{label} "
            f"{body}</li>"
        )
    return f'<h3>Top samples by impact</h3><ol class="samples">{"".join(rows)}</ol>'


def _logits(entry: dict) -> str:
    top = entry.get("top_logits") or {}
    if not top.get("positive") and not top.get("negative"):
        return ""
    columns = []
    for sign, title in (("positive", "raised"), ("negative", "lowered")):
        rows = "".join(
            f"<tr><td>{_e(item['label'])}</td><td>{_fmt(item['value'])}</td></tr>"
            for item in top.get(sign, [])
        )
        css = "pos" if sign == "positive" else "neg"
        columns.append(
            f'<table class="{css}"><tr><th>{title}</th><th>logit</th></tr>{rows}</table>'
        )
    return f'<h3>Top logits (both signs)</h3><div class="logits">{"".join(columns)}</div>'


def _analysis_stats(entry: dict) -> str:
    """Mean impact, top-sample purity and the analysis's ±δ intervention check, where present."""
    stats = {}
    if "mean_impact" in entry:
        stats["mean impact"] = _fmt(entry["mean_impact"])
    if "purity" in entry:
        stats["top-sample label purity"] = _fmt(entry["purity"])
    effect = entry.get("intervention")
    if effect:
        for where, name in (("top_samples", "top samples"), ("random_samples", "random samples")):
            values = effect[where]
            stats[f"output change on {name}, δ = ∓{_fmt(effect['delta'])}"] = (
                f"{_fmt(values['minus'])} / {_fmt(values['plus'])}"
            )
    return _summary_table(stats) if stats else ""


def _intervention(result: dict, k: int, assets: _Assets) -> str:
    src = assets.png(f"intervention_{k}.png", plots.png(plots.intervention_figure(result)))
    impact = np.asarray(result["impact"])
    change = np.asarray(result["change"])
    top = np.argsort(-impact, kind="stable")[:N_TOP_INTERVENTION]
    rest = np.setdiff1d(np.arange(len(impact)), top)
    # Runs written before the noise floor existed: only an exact 0 is below it.
    floor = float(result.get("noise_floor", 0.0))
    rows = []
    for delta, row in zip(result["deltas"], change):
        on_top = float(row[top].mean()) if len(top) else 0.0
        on_rest = float(row[rest].mean()) if len(rest) else 0.0
        ratio = _fmt(on_top / on_rest) if on_rest > floor else "below noise"
        rows.append(
            f"<tr><td>{_fmt(delta)}</td><td>{_fmt(on_top)}</td><td>{_fmt(on_rest)}</td>"
            f"<td>{ratio}</td></tr>"
        )
    return (
        f"<h3>Intervention</h3>{_img(src, f'intervention on subnetwork {k}')}"
        f"<table><tr><th>δ</th><th>mean change, top {len(top)} by impact</th>"
        f"<th>mean change, other samples</th><th>ratio</th></tr>{''.join(rows)}</table>"
    )


def _summary_table(items: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items.items())
    return f"<table>{rows}</table>"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report/index.html (or OUT/index.html) and its images; returns the page."""
    run = RunDir(Path(run_dir))
    if not run.finished:
        run.require()  # says what the folder is: missing, an experiment's, a saved decomposition
    config, meta, v_out, p_active = _load_v_out(run)
    out = writable_folder(Path(out) if out is not None else run.report, "report")
    if out.exists():
        for stale in ("img", "assets"):
            shutil.rmtree(out / stale, ignore_errors=True)
    assets = _Assets(out)
    records = run.metrics_records() or meta["history"]
    analysis_file = run.analysis / "analysis.json"
    analysis = io.read_json(analysis_file, "analysis") if analysis_file.is_file() else {}
    by_index = {s["index"]: s for s in analysis.get("subnetworks", [])}
    interventions = {}
    for path in sorted(run.interventions.glob("subnetwork_*.json")):
        result = io.read_json(path, "intervention result")
        interventions[int(result["subnetwork"])] = result

    dead = [int(k) for k in np.flatnonzero(p_active == 0)]
    ev = meta["evaluation"]
    overview = {
        "subnetworks": config.n_subnetworks,
        "dead subnetworks": f"{len(dead)}",
        "loss (paper, eq. 8)": _fmt(ev["loss_paper"]),
        "loss (pooled squared)": _fmt(ev["loss_pooled_squared"]),
        "evaluated samples": ev["n_samples"],
        "epochs run": len(records),
        "tensors": ", ".join(
            f"{n} {tuple(s)} rank {meta['ranks'][n]}" for n, s in meta["shapes"].items()
        ),
    }
    parts = [
        "<section id=overview><h2>Overview</h2>",
        _summary_table(overview),
        "<h3>Training</h3>",
        _img(
            assets.png("loss_curves.png", plots.png(plots.loss_curves_figure(records))),
            "loss curves",
        )
        if records
        else "<p>no metrics logged</p>",
        "<h3>P_act</h3>",
        _img(
            assets.png("p_active.png", plots.png(plots.p_active_figure(p_active, histogram=True))),
            "P_act histogram",
        ),
        "<h3>Dead subnetworks</h3><p>",
        ", ".join(f'<a href="#subnetwork-{k}">{k}</a>' for k in dead) or "none",
        "</p>",
    ]
    if analysis.get("summary"):
        parts += ["<h3>Analysis summary</h3>", _summary_table(analysis["summary"])]
    config_text = run.config.read_text() if run.config.is_file() else config.to_yaml()
    parts += ["<h3>Config</h3><pre>", _e(config_text), "</pre></section>"]

    nav, sections = [], []
    for k in range(config.n_subnetworks):
        p = float(p_active[k])
        is_dead = p == 0
        css = ' class="is-dead"' if is_dead else ""
        data = f'data-p-active="{p!r}" data-index="{k}"'
        badge = ' <span class="dead">dead</span>' if is_dead else ""
        nav.append(
            f'<li {data}{css}><a href="#subnetwork-{k}"><span>#{k}{badge}</span>'
            f"<span>{_fmt(p)}</span></a></li>"
        )
        entry = by_index.get(k, {})
        body = [
            f'<section class="subnetwork{" is-dead" if is_dead else ""}" '
            f'id="subnetwork-{k}" {data}>',
            f"<h2>Subnetwork {k}{badge}</h2><p>P_act = {_fmt(p)}</p>",
            _heatmaps(v_out, k, assets),
            _analysis_stats(entry),
            _samples(entry, run.analysis, assets),
            _logits(entry),
        ]
        if k in interventions:
            body.append(_intervention(interventions[k], k, assets))
        body.append("</section>")
        sections.append("".join(body))

    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    csp = (
        "default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'"
    )
    title = f"L3D report: {run.path.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_e(title)}</title><style>{_STYLE}</style></head>
<body>
<nav><strong>{_e(title)}</strong>
<p><a href="#overview">Overview</a></p>
<label>sort <select id="sort">
<option value="pActive:desc">P_act, high first</option>
<option value="pActive:asc">P_act, low first</option>
<option value="index:asc">index</option></select></label>
<label><input type="checkbox" id="hide-dead"> hide dead</label>
<p>subnetwork · P_act</p><ol id="nav-list">{"".join(nav)}</ol></nav>
<main><h1>{_e(title)}</h1>{"".join(parts)}
<div id="subnetworks">{"".join(sections)}</div></main>
<script>{_SCRIPT}</script>
</body></html>
"""
    io.write_text(out / "index.html", page)
    return out / "index.html"
