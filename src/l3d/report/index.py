"""The index page: the run at a glance (numbers, losses, P_act, co-activation) and one table row
per subnetwork, sortable by any numeric column, searchable by its top tokens / labels / features,
with dead ones hideable. Rows are rendered in P_act order on the server, so the page needs no
script to be read and an anchor (index.html#subnetwork-3) lands on its row at once."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from l3d import controls, plots
from l3d.report import svg
from l3d.report.data import AdapterInfo, RunData, top_rows, top_terms, unit_name
from l3d.report.heatmaps import heatmap_png, pool_max_abs
from l3d.report.html import Assets, e, fmt, img, page, png_size, table

SCRIPT = """
const body = document.querySelector("#subnetworks tbody");
const rows = Array.from(body.rows);
const search = document.getElementById("search");
const hideDead = document.getElementById("hide-dead");
const count = document.getElementById("count");
let sortKey = "pActive", descending = true;
function value(row) {
  const v = row.dataset[sortKey];
  return v === undefined || v === "" ? -Infinity : parseFloat(v);
}
function sortRows() {
  rows.sort((a, b) => (descending ? value(b) - value(a) : value(a) - value(b)));
  body.append(...rows);
  document.querySelectorAll("th[data-key]").forEach((th) => {
    const on = th.dataset.key === sortKey;
    th.setAttribute("aria-sort", on ? (descending ? "descending" : "ascending") : "none");
  });
}
function filterRows() {
  const query = search.value.trim().toLowerCase();
  let shown = 0;
  for (const row of rows) {
    const keep = (!query || row.dataset.search.includes(query)) &&
      !(hideDead.checked && row.dataset.dead === "1");
    row.hidden = !keep;
    shown += keep;
  }
  count.textContent = shown + " of " + rows.length + " shown";
}
document.querySelectorAll("th[data-key]").forEach((th) => {
  th.addEventListener("click", () => {
    descending = th.dataset.key === sortKey ? !descending : th.dataset.key !== "index";
    sortKey = th.dataset.key;
    sortRows();
  });
  th.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      th.click();
    }
  });
});
search.addEventListener("input", filterRows);
hideDead.addEventListener("change", filterRows);
filterRows();
"""

STYLE = """
#subnetworks { width: 100%; }
#subnetworks th[data-key] { cursor: pointer; user-select: none; white-space: nowrap; }
#subnetworks th[aria-sort="descending"]::after { content: " ▼"; }
#subnetworks th[aria-sort="ascending"]::after { content: " ▲"; }
#subnetworks tr:target { background: #fff3c4; }
#subnetworks td.terms { font-family: ui-monospace, monospace; font-size: 0.8rem;
                        white-space: pre-wrap; max-width: 28rem; }
.controls { display: flex; gap: 1.2rem; align-items: center; margin: 0.6rem 0; }
.controls input[type=search] { width: 18rem; padding: 0.2rem 0.4rem; }
#subnetworks tbody tr:hover { background: #f4f8ff; }
#subnetworks tr[data-dead="1"] { color: #999; }
"""


def write_index(
    data: RunData,
    coactive: np.ndarray | None,
    units: list[tuple[int, float]] | None,
    assets: Assets,
) -> str:
    """The HTML of index.html."""
    p_active = data.p_active
    ev = data.meta["evaluation"]
    n_dead = int((p_active == 0).sum())
    overview: dict[str, object] = {
        "subnetworks": f"{data.n_v} ({n_dead} dead)",
        "loss (paper, eq. 8)": fmt(ev["loss_paper"]),
        "loss (pooled squared)": fmt(ev["loss_pooled_squared"]),
        "evaluated samples": ev["n_samples"],
        "epochs run": len(data.records),
        "tensors": ", ".join(
            f"{n} {tuple(s)} rank {data.meta['ranks'][n]}" for n, s in data.meta["shapes"].items()
        ),
    }
    summary = data.summary
    if summary:
        median = summary.get("median_intervention_selectivity")
        overview["analysed samples"] = summary.get("n_samples")
        overview["median intervention selectivity"] = (
            "not measurable (below noise)" if median is None else fmt(median)
        )
        if "purity" in summary:
            overview["top-sample label purity"] = fmt(summary["purity"])
    plots_html = [
        _figure(assets, "loss_curves.png", plots.loss_curves_figure(data.records), "losses")
        if data.records
        else "<p>no metrics logged</p>",
        _figure(
            assets,
            "p_active.png",
            plots.p_active_figure(p_active, histogram=True),
            "P_act: histogram and per subnetwork",
        ),
    ]
    first = [table(overview)]
    if coactive is not None:
        matrix = pool_max_abs(coactive)
        # A whole-pixel zoom keeps cells crisp: up to 32 px a cell, about 400 px a side at most.
        side = matrix.shape[0] * min(32, max(1, 400 // matrix.shape[0]))
        src = assets.png("coactivation.png", heatmap_png(coactive, 1.0))
        pooled = " (max pooled)" if matrix.shape != coactive.shape else ""
        first.append(
            f'<figure><div class="row">{img(src, "co-activation", (side, side), "pixel")}'
            f"{svg.colour_bar(-1.0, 1.0, side)}</div><figcaption>co-activation: cosine of "
            f"two subnetworks' impact over samples,<br>subnetworks by index{pooled}</figcaption>"
            "</figure>"
        )
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in data.notes)
    run_config = data.run.config
    config_text = run_config.read_text() if run_config.is_file() else data.config.to_yaml()
    body = (
        f"<h1>{e(_title(data))}</h1>{notes}"
        f'<div class="row">{"".join(first)}</div>'
        f'<div class="row">{"".join(plots_html)}</div>'
        f"{_controls(data)}"
        f"{_adapters(data, assets)}"
        f"<h2>Subnetworks</h2>{_table(data, units)}"
        f"<details><summary>config</summary><pre>{e(config_text)}</pre></details>"
    )
    header = f"<strong>{e(_title(data))}</strong><span>{data.n_v} subnetworks</span>"
    return page(_title(data), header, body, SCRIPT, STYLE)


def _controls(data: RunData) -> str:
    """Each headline metric beside the shuffled-weights control's, and cross-seed stability."""
    found = data.controls
    if found is None:
        return (
            "<h2>Controls</h2><p>None yet: <code>l3d control "
            f"{e(data.run.path)}</code> decomposes the model with shuffled weights and with "
            "another seed, to tell learned structure from what any network gives.</p>"
        )
    parts = ["<h2>Controls</h2>"]
    shuffled = found.get("shuffled")
    if shuffled is not None:
        rows = []
        for row in shuffled["comparison"]:
            gap, ratio = row.get("gap"), row["kind"] == "ratio"
            shown = "" if gap is None else f"×{gap:.3g}" if ratio else f"{gap:+.3g}"
            flag = '<strong class="flag">small gap</strong>' if row["flagged"] else ""
            label = controls.LABELS.get(row["metric"], row["metric"])
            rows.append(
                f"<tr><th>{e(label)}</th><td>{e(fmt(row['value']))}</td>"
                f"<td>{e(fmt(row['control']))}</td><td>{e(shown)}</td><td>{flag}</td></tr>"
            )
        parts.append(
            "<p>The same decomposition of the model with every parameter tensor's entries "
            "shuffled: a gap too small is no evidence of learned structure (the loss is shown "
            "only; a random network's is often lower).</p><table><tr><th>metric</th><th>run</th>"
            f"<th>shuffled</th><th>gap</th><th></th></tr>{''.join(rows)}</table>"
        )
    seed = found.get("seed")
    if seed is not None:
        flag = ' <strong class="flag">unstable</strong>' if seed["flagged"] else ""
        parts.append(
            f"<p>Cross-seed stability (seed {e(seed['second_seed'])}): mean matched |cos| of "
            f"live subnetworks {e(fmt(seed['mmcs']))}, minimum {e(fmt(seed['min']))}{flag} "
            "(1.0: the same subnetworks).</p>"
        )
    return "".join(parts)


def _adapters(data: RunData, assets: Assets) -> str:
    """One row per finetuning adapter in the run folder (paper Section 4.2: W0 + sum_k alpha_k
    v_k): what it moved along, how much, and what it bought on the target and the retain data,
    with the curves of its training."""
    if not data.adapters:
        return (
            "<h2>Adapters</h2><p>None yet: <code>l3d finetune "
            f"{e(data.run.path)} --subnetworks contrast:3 --data edit.safetensors --retain "
            f"keep.safetensors --out {e(data.run.path / 'adapter')}</code> edits the model along "
            "chosen subnetworks; adapters saved in the run folder are shown here.</p>"
        )
    rows = []
    for adapter in data.adapters:
        history = adapter.history
        links = " ".join(f'<a href="subnetworks/{k}.html">#{k}</a>' for k in adapter.subnetworks)
        # Cores train a core per subnetwork and tensor instead of alpha (which stays 0).
        alphas = "–" if adapter.train == "cores" else ", ".join(fmt(a) for a in adapter.alpha)
        w0 = adapter.w0_norms
        moved = {n: d / w0[n] for n, d in adapter.delta_norms.items() if w0.get(n)}
        largest = max(moved, key=lambda n: moved[n], default=None)
        relative = "–" if largest is None else f"{fmt(moved[largest])} ({e(largest)})"
        rows.append(
            f"<tr><td>{e(adapter.path)}</td><td>{e(adapter.train)}</td>"
            f"<td>{e(_recipe(adapter))}</td><td>{links}</td>"
            f'<td>{e(alphas)}</td><td class="num">{adapter.n_trainable}</td>'
            f'<td class="num">{len(history)}</td><td>{e(_change(history, "objective"))}</td>'
            f"<td>{e(_change(history, 'retain_distance'))}</td><td>{relative}</td></tr>"
        )
    histories = {str(a.path): a.history for a in data.adapters if a.history}
    figure = (
        _figure(
            assets,
            "adapters.png",
            plots.adapter_history_figure(histories),
            "adapters: objective per step; objective against retain distance",
        )
        if histories
        else ""
    )
    return (
        "<h2>Adapters</h2><p>Finetuning along subnetworks (<code>l3d finetune</code>): the "
        "objective, learning rate and retain weight it was trained with, the chosen subnetworks, "
        "α along each (with train factors their factors move too; cores train a core "
        "per subnetwork and tensor instead of α), the "
        "objective on the target data and the distance to the frozen model on the retain data "
        "from the first to the last step, and the largest ‖ΔW‖ / ‖W0‖ over the tensors (those "
        "with W0 ≠ 0).</p>"
        "<table><tr><th>folder</th><th>train</th><th>trained with</th><th>subnetworks</th>"
        "<th>α</th><th>trained numbers</th><th>steps</th><th>objective</th><th>retain distance</th>"
        f"<th>largest ‖ΔW‖ / ‖W0‖</th></tr>{''.join(rows)}</table>{figure}"
    )


def _recipe(adapter: AdapterInfo) -> str:
    """The objective, lr and retain weight it was trained with ("–" for adapters saved before
    l3d recorded them)."""
    if adapter.objective is None:
        return "–"
    recipe = f"{adapter.objective}, lr {fmt(adapter.lr)}"
    if adapter.retain_weight is not None:
        recipe += f", retain weight {fmt(adapter.retain_weight)}"
    return recipe


def _change(history: list[dict[str, float]], key: str) -> str:
    """A history value at the first and the last step ("–" where it was not recorded)."""
    if not history or key not in history[-1]:
        return "–"
    return f"{fmt(history[0][key])} → {fmt(history[-1][key])}"


def _title(data: RunData) -> str:
    return f"L3D report: {data.run.path.resolve().name}"


def _figure(assets: Assets, name: str, figure: Figure, caption: str) -> str:
    data = plots.png(figure)
    src = assets.png(name, data)
    # Shown at 70 %: both run-level plots then fit beside each other on a laptop screen.
    width, height = png_size(data)
    size = (round(0.7 * width), round(0.7 * height))
    return f"<figure>{img(src, caption, size)}<figcaption>{e(caption)}</figcaption></figure>"


def _table(data: RunData, units: list[tuple[int, float]] | None) -> str:
    has_impact = data.impact is not None
    # (sort key, title, numeric): numeric columns are right-aligned like their cells.
    columns = [("index", "#", True), ("pActive", "P_act", True)]
    if has_impact:
        columns += [("impact", "mean impact", True)]
    columns += [("dead", "dead", False)]
    if units is not None:
        columns += [("unitShare", "matched unit", False)]
    if has_impact:
        columns += [("", "impact histogram", False), ("", _terms_header(data), False)]
    if data.summary:
        columns += [("selectivity", "selectivity", True)]
    head = "".join(_th(key, title, numeric) for key, title, numeric in columns)
    order = np.argsort(-data.p_active, kind="stable")
    rows = [_row(data, int(k), units) for k in order]
    return (
        '<div class="controls"><input type="search" id="search" placeholder="search top '
        'tokens, labels, features, #index" aria-label="search"><label><input type="checkbox" '
        'id="hide-dead"> hide dead</label><span id="count"></span></div>'
        f'<table id="subnetworks"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
        "</table>"
    )


def _th(key: str, title: str, numeric: bool) -> str:
    sort = f' data-key="{key}" tabindex="0"' if key else ""  # sortable, also by keyboard
    if key == "pActive":  # the order the rows are written in
        sort += ' aria-sort="descending"'
    align = ' class="num"' if numeric else ""
    return f"<th{sort}{align}>{e(title)}</th>"


def _terms_header(data: RunData) -> str:
    samples = data.samples
    if samples is None:
        return "top samples"
    if samples.kind == "text":
        return "top tokens"
    if samples.labels is not None:
        return "top labels"
    return "top features" if samples.kind == "vector" else "top samples"


def _row(data: RunData, k: int, units: list[tuple[int, float]] | None) -> str:
    p = float(data.p_active[k])
    dead = p == 0
    entry = data.entry(k)
    attrs = {"index": str(k), "p-active": f"{p:.6g}", "dead": "1" if dead else "0"}
    cells = [
        f'<td class="num"><a href="subnetworks/{k}.html">#{k}</a></td>',
        f'<td class="num">{fmt(p)}</td>',
    ]
    search = [f"#{k}"]
    if data.impact is not None:
        column = data.impact[:, k]
        attrs["impact"] = f"{float(column.mean()):.6g}"
        cells.append(f'<td class="num">{fmt(float(column.mean()))}</td>')
    cells.append(f"<td>{'<span class=dead>dead</span>' if dead else ''}</td>")
    if units is not None and data.units is not None:
        u, share = units[k]
        name = unit_name(data.units, u)
        attrs["unit-share"] = f"{share:.6g}"
        search.append(name)
        cells.append(f"<td>{e(name)} <span class=note>{100 * share:.0f}%</span></td>")
    if data.impact is not None:
        column = data.impact[:, k]
        terms = top_terms(data, top_rows(column, 10)) if column.max() > 0 else []
        search += terms
        cells.append(f"<td>{svg.sparkline(column)}</td>")
        cells.append(f'<td class="terms">{" ".join(f"[{e(t)}]" for t in terms)}</td>')
    if data.summary:
        effect = entry.get("intervention") or {}
        selectivity = effect.get("selectivity")
        attrs["selectivity"] = "" if selectivity is None else f"{float(selectivity):.6g}"
        shown = "below noise" if effect and selectivity is None else fmt(selectivity)
        cells.append(f'<td class="num">{shown}</td>')
    attrs["search"] = " ".join(search).lower()
    data_attrs = " ".join(f'data-{key}="{e(value)}"' for key, value in attrs.items())
    return f'<tr class="subnetwork" id="subnetwork-{k}" {data_attrs}>{"".join(cells)}</tr>'
