"""One page per subnetwork: what it is (P_act, impact histogram, V_out heatmaps), where it matters
(top examples and examples from impact quantiles, text shaded token by token), what it does
(outputs it moves, interventions with their noise floor) and its neighbours (co-active and
similar subnetworks)."""

from __future__ import annotations

import numpy as np
import torch

from l3d import plots
from l3d.report import svg
from l3d.report.data import (
    RunData,
    quantile_examples,
    token_text,
    top_rows,
    unit_name,
    visible,
)
from l3d.report.heatmaps import as_matrix, heatmap_png, pool_max_abs
from l3d.report.html import Assets, e, fmt, img, page, png_size, table

N_TOP = 10
PER_BAND = 5
N_RELATED = 5
# Samples counted as "most affected" when an `l3d intervene` result is summarised.
N_TOP_INTERVENTION = 10
# V_out heatmaps are drawn with their long side between these many CSS pixels.
HEATMAP_MIN_SIDE, HEATMAP_MAX_SIDE = 160, 560

STYLE = """
ol.examples { list-style: none; padding: 0; margin: 0.3rem 0; }
ol.examples.compact { display: grid; grid-template-columns: repeat(auto-fill, minmax(24rem, 1fr));
                      column-gap: 1.5rem; }
ol.examples li { display: flex; gap: 0.8rem; align-items: flex-start; padding: 0.25rem 0;
                 border-bottom: 1px solid #eee; }
.meta { flex: 0 0 9rem; font-size: 0.8rem; color: #555; font-variant-numeric: tabular-nums; }
.meta strong { color: #222; font-size: 0.9rem; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.85rem; white-space: pre-wrap;
       line-height: 1.7; word-break: break-word; }
.ctx span { border-radius: 2px; padding: 0 1px; }
.ctx span.here { outline: 2px solid #222; }
.feat { font-size: 0.8rem; color: #444; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 1.2rem; align-items: flex-start; }
.heatmaps figcaption { max-width: 18rem; }
a.rel { display: inline-block; min-width: 3.5rem; }
img.sample { width: 64px; height: 64px; object-fit: contain; }
table.generations td { vertical-align: top; max-width: 22rem; font-family: ui-monospace, monospace;
                       font-size: 0.85rem; white-space: pre-wrap; word-break: break-word; }
table.generations td.changed { background: #fff3c4; }
"""


def write_page(
    data: RunData,
    k: int,
    cosine: np.ndarray,
    coactive: np.ndarray | None,
    units: list[tuple[int, float]] | None,
    assets: Assets,
) -> str:
    """The HTML of subnetwork k's page (it lives in subnetworks/, so assets are under ../)."""
    p = float(data.p_active[k])
    dead = ' <span class="dead">dead</span>' if p == 0 else ""
    entry = data.entry(k)
    stats: dict[str, object] = {"P_act": fmt(p)}
    if data.impact is not None:
        column = data.impact[:, k]
        stats["mean impact"] = fmt(float(column.mean()))
        stats["samples with impact > 0"] = f"{int((column > 0).sum())} of {column.size}"
    if units is not None and data.units is not None:
        u, share = units[k]
        stats["matched ground-truth unit"] = (
            f"{unit_name(data.units, u)} ({100 * share:.0f}% of its unit impact)"
        )
    if "purity" in entry:
        stats["top-sample label purity"] = fmt(entry["purity"])
    parts = [f"<h1>Subnetwork {k}{dead}</h1>", *(f'<p class="note">{e(n)}</p>' for n in data.notes)]
    first = [table(stats)]
    if data.impact is not None:
        first.append(
            f"<figure>{svg.impact_histogram(data.impact[:, k])}<figcaption>impact of "
            f"subnetwork {k} per sample</figcaption></figure>"
        )
    first.append(_related(k, cosine, coactive))
    parts.append(f'<div class="row">{"".join(first)}</div>')
    parts.append(_logits(entry, data.summary))
    parts.append(_effect(entry, data.summary))
    parts.append(_generations(entry))
    if k in data.interventions:
        parts.append(_intervention(data.interventions[k], k, assets))
    elif data.summary:  # an analysed run: `l3d intervene` works on it too
        parts.append(
            f'<p class="note">Output change over a range of δ: <code>l3d intervene '
            f"{e(data.run.path)} --subnetwork {k} --delta -2 -1 1 2</code>, then report again."
            "</p>"
        )
    parts.append(_examples(data, k, assets))
    parts.append(_heatmaps(data, k, assets))
    n_v = data.n_v
    header = (
        f'<a href="../index.html#subnetwork-{k}">← all subnetworks</a>'
        f'<a href="{(k - 1) % n_v}.html">← #{(k - 1) % n_v}</a>'
        f'<a href="{(k + 1) % n_v}.html">#{(k + 1) % n_v} →</a>'
        f"<span>{e(data.run.path.resolve().name)}</span>"
    )
    return page(
        f"Subnetwork {k} · {data.run.path.resolve().name}", header, "".join(parts), style=STYLE
    )


def _generations(entry: dict) -> str:
    """Greedy continuations of the top samples' contexts at W0 - δ v_k, W0, W0 + δ v_k, side by
    side (written by the analysis for causal LMs)."""
    generations = entry.get("generations")
    if not generations:
        return ""
    delta = fmt(generations[0]["delta"])
    head = (
        f"<tr><th>prompt (top sample)</th><th>δ = −{delta}</th><th>W0</th><th>δ = +{delta}</th>"
        "</tr>"
    )
    rows = "".join(
        f'<tr><td class="gen">{e(visible(g["prompt"]))}</td>'
        + "".join(
            f'<td class="gen{" changed" if g[side] != g["zero"] else ""}">{e(visible(g[side]))}'
            "</td>"
            for side in ("minus", "zero", "plus")
        )
        + "</tr>"
        for g in generations
    )
    return (
        "<h2>Greedy continuations</h2><p class=note>the model's next tokens after each top "
        "sample's context (up to and including its token), moved along V_out by −δ and +δ; "
        "a highlighted cell differs from W0's</p>"
        f'<table class="generations">{head}{rows}</table>'
    )


def _related(k: int, cosine: np.ndarray, coactive: np.ndarray | None) -> str:
    def links(matrix: np.ndarray) -> str:
        row = matrix[k]
        order = [j for j in np.argsort(-row, kind="stable").tolist() if j != k][:N_RELATED]
        return "".join(
            f'<tr><td><a class="rel" href="{j}.html">#{j}</a></td><td class="num">'
            f"{fmt(float(row[j]))}</td></tr>"
            for j in order
        )

    if cosine.shape[0] < 2:
        return ""
    blocks = [f"<table><tr><th>most similar</th><th>cos V_out</th></tr>{links(cosine)}</table>"]
    if coactive is not None:
        blocks.append(
            f"<table><tr><th>most co-active</th><th>cos impact</th></tr>{links(coactive)}</table>"
        )
    return f'<div class="row">{"".join(blocks)}</div>'


def _logits(entry: dict, summary: dict) -> str:
    top = entry.get("top_logits")
    if not top:
        return ""
    what = summary.get("derivative_label", "d output/dδ")
    columns = []
    for sign, title in (("positive", "raised"), ("negative", "lowered")):
        items = top.get(sign, [])
        css = "pos" if sign == "positive" else "neg"
        if not items:
            columns.append(
                f'<div><strong class="{css}">{title}</strong><p class="note">none</p></div>'
            )
            continue
        rows = "".join(
            f'<tr><td class="{css}" title="output {e(item["index"])}">{e(visible(item["label"]))}'
            f'</td><td class="num">{fmt(item["value"])}</td></tr>'
            for item in items
        )
        columns.append(
            f'<table><tr><th class="{css}">{title}: output</th><th class="num">{e(what)}</th>'
            f"</tr>{rows}</table>"
        )
    return (
        f"<h2>Outputs it moves</h2><p class=note>mean {e(what)} along V_out over its top samples; "
        "a direction's sign is arbitrary, so both lists matter</p>"
        f'<div class="row">{"".join(columns)}</div>'
    )


def _change(value: float, floor: float) -> str:
    """An output change, or "below noise" when round-off alone could produce it."""
    return f"below noise (≤ {fmt(floor)})" if value <= floor else fmt(value)


def _effect(entry: dict, summary: dict) -> str:
    """The analysis's ±δ check: change on top samples against random ones, and selectivity only
    when the change on random samples is above the noise floor."""
    i = entry.get("intervention")
    if not i:
        return ""
    floor = float(i.get("noise_floor") or 0.0)
    selectivity = i.get("selectivity")
    if i.get("below_noise") or selectivity is None:
        verdict = (
            f"not measurable: the change on random samples is below the noise floor {fmt(floor)}"
        )
    else:
        verdict = f"{fmt(selectivity)}× (noise floor {fmt(floor)})"

    def pair(change: dict) -> str:
        return f"{_change(change['minus'], floor)} / {_change(change['plus'], floor)}"

    change, delta = summary.get("change_label", "output change"), fmt(i["delta"])
    rows = {
        f"{change} on top samples, δ = −{delta} / +{delta}": pair(i["top_samples"]),
        "on random samples": pair(i["random_samples"]),
        "selectivity (top / random)": verdict,
    }
    return f"<h2>Intervention</h2>{table(rows)}"


def _intervention(result: dict, k: int, assets: Assets) -> str:
    figure = plots.png(plots.intervention_figure(result))
    src = assets.png(f"intervention_{k}.png", figure)
    impact = np.asarray(result["impact"])
    change = np.asarray(result["change"])
    top = np.argsort(-impact, kind="stable")[:N_TOP_INTERVENTION]
    rest = np.setdiff1d(np.arange(len(impact)), top)
    floor = result["noise_floor"]  # 0.0 in results written before the floor existed
    rows = []
    for delta, row in zip(result["deltas"], change):
        on_top = float(row[top].mean()) if len(top) else 0.0
        on_rest = float(row[rest].mean()) if len(rest) else 0.0
        ratio = f"{fmt(on_top / on_rest)}×" if on_rest > floor else "below noise"
        rows.append(
            f'<tr><td class="num">{fmt(delta)}</td><td class="num">{_change(on_top, floor)}</td>'
            f'<td class="num">{_change(on_rest, floor)}</td><td class="num">{ratio}</td></tr>'
        )
    return (
        f"<h3>Output change over δ (l3d intervene)</h3>"
        f'<div class="row">{img("../" + src, f"intervention on subnetwork {k}", png_size(figure))}'
        f'<table><tr><th class="num">δ</th><th class="num">mean change, top {len(top)} by impact'
        f'</th><th class="num">other samples</th><th class="num">ratio</th></tr>{"".join(rows)}'
        "</table></div>"
    )


# Examples --------------------------------------------------------------------------------------


def _examples(data: RunData, k: int, assets: Assets) -> str:
    if data.impact is None:
        return ""
    column = data.impact[:, k]
    scale = float(column.max())
    top = top_rows(column, N_TOP)
    top = top[column[top] > 0]
    if top.size == 0:
        return "<h2>Examples</h2><p class=note>no sample has impact > 0</p>"
    parts = ["<h2>Top examples</h2>", _example_list(data, k, top.tolist(), scale, assets)]
    for label, rows in quantile_examples(column, PER_BAND, set(top.tolist())):
        parts += [f"<h3>{e(label)}</h3>", _example_list(data, k, rows, scale, assets)]
    if data.samples is not None and data.samples.kind == "text":
        parts.insert(
            1,
            '<p class="note">Every token shaded by its own impact for this '
            "subnetwork (darkest = its largest impact); the framed token is the "
            "sample; hover for values.</p>",
        )
    return "".join(parts)


def _example_list(data: RunData, k: int, rows: list[int], scale: float, assets: Assets) -> str:
    assert data.impact is not None
    items = []
    samples = data.samples
    for s in rows:
        label = ""
        if samples is not None and samples.labels is not None:
            label = f"<br>{e(samples.labels[s])}"
        value = fmt(float(data.impact[s, k]))
        meta = f'<span class="meta"><strong>{value}</strong> · #{s}{label}</span>'
        items.append(f"<li>{meta}{_sample(data, k, s, scale, assets)}</li>")
    # Vectors and images are small: several per line; text windows take the whole width.
    compact = samples is not None and samples.kind in ("vector", "image")
    return f'<ol class="examples{" compact" if compact else ""}">{"".join(items)}</ol>'


def _sample(data: RunData, k: int, s: int, scale: float, assets: Assets) -> str:
    samples = data.samples
    if samples is None:
        return f"<span>sample {s}</span>"
    row, pos = (int(v) for v in samples.positions[s])
    if samples.kind == "text":
        return _context(data, k, row, pos, scale)
    if samples.kind == "vector":
        x = samples.inputs[row].numpy()
        order = np.argsort(-np.abs(x), kind="stable")[:8]
        active = ", ".join(f"f{j} {fmt(float(x[j]))}" for j in order.tolist() if x[j] != 0)
        return f'{svg.input_bars(x)}<span class="feat">{e(active or "all zero")}</span>'
    if samples.kind == "image":
        name = f"input_{row}.png"
        src = assets.has(name)
        if src is None:
            plots.save_image(samples.inputs[row], assets.out / "img" / name)
            src = assets.has(name)
        return img(f"../{src}", f"input {row}", css="pixel sample")
    return f"<span>input {row}, position {pos}</span>"


def _context(data: RunData, k: int, row: int, pos: int, scale: float) -> str:
    """Input `row`'s whole window, each token shaded by its own impact for subnetwork k."""
    samples = data.samples
    assert samples is not None and samples.ids is not None and samples.mask is not None
    assert data.impact is not None
    own = samples.samples_of_input(row)
    impact_at = dict(zip(samples.positions[own, 1].tolist(), data.impact[own, k].tolist()))
    spans = []
    for j, token_id in enumerate(samples.ids[row].tolist()):
        if not samples.mask[row, j]:
            continue
        text = token_text(samples, token_id)
        value = impact_at.get(j)
        alpha = min(value / scale, 1.0) if value and scale > 0 else 0.0
        style = f' style="background:rgba(255,120,0,{alpha:.2f})"' if alpha >= 0.01 else ""
        here = ' class="here"' if j == pos else ""
        shown = "–" if value is None else fmt(value)
        title = f"{text} · id {token_id} · position {j} · impact {shown}"
        spans.append(f'<span{here}{style} title="{e(title)}">{e(text)}</span>')
    return f'<span class="ctx">{"".join(spans)}</span>'


# V_out -----------------------------------------------------------------------------------------


def _heatmaps(data: RunData, k: int, assets: Assets) -> str:
    with torch.no_grad():
        dense = {n: d.numpy() for n, d in data.v_out.direction(k).items()}
    scale = max(float(np.abs(d).max()) for d in dense.values())
    shares = {n: float((d**2).sum()) for n, d in dense.items()}
    total = sum(shares.values()) or 1.0
    figures = []
    for i, (name, values) in enumerate(dense.items()):
        src = assets.png(f"v_out_{k}_{i}.png", heatmap_png(values, scale))
        rows, cols = pool_max_abs(as_matrix(values)).shape
        long = max(rows, cols)
        zoom = min(max(HEATMAP_MIN_SIDE, 6 * long), HEATMAP_MAX_SIDE) / long
        # A vector stays one row, drawn at least 14 px high rather than one zoomed pixel.
        size = (round(cols * zoom), max(round(rows * zoom), 14))
        shape = "×".join(str(s) for s in values.shape) or "scalar"
        axes = (
            "one row" if values.ndim <= 1 else f"rows: dim 0 ({rows}), columns: the rest ({cols})"
        )
        pooled = " (max-|v| pooled)" if (rows, cols) != as_matrix(values).shape else ""
        caption = f"{name} ({shape}; {axes}{pooled}): {100 * shares[name] / total:.1f}% of ‖v‖²"
        figures.append(
            f"<figure>{img('../' + src, f'V_out of subnetwork {k}, {name}', size, 'pixel')}"
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    return (
        "<h2>V_out per tensor</h2><p class=note>one colour scale for all tensors of this "
        f'subnetwork (red +, blue −)</p><div class="heatmaps">{"".join(figures)}'
        f"{svg.colour_bar(-scale, scale)}</div>"
    )
