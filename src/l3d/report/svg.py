"""Small inline SVG figures of the report: impact histograms (log counts), sparklines, an input
vector as bars, colour bars. Inline SVG costs no file or request per figure, scales sharply, and
carries its numbers as hover titles; matplotlib PNGs are kept for the run-level plots."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps

from l3d.report.html import e, fmt

HIST_BINS = 40
SPARK_BINS = 24


def impact_histogram(values: np.ndarray, width: int = 380, height: int = 150) -> str:
    """Histogram of a subnetwork's impact over samples, counts on a log axis (1 + count, so a bin
    of one sample is visible and an empty one is flat)."""
    top = float(values.max()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=HIST_BINS, range=(0.0, top if top > 0 else 1.0))
    left, plot_h = 44, height - 40
    plot_w = width - left - 24  # room for the last x label
    y_max = math.log10(1 + max(int(counts.max()), 1))

    def y(count: float) -> float:
        return 10 + plot_h * (1 - math.log10(1 + count) / y_max)

    bar_w = plot_w / HIST_BINS
    bars = "".join(
        f'<rect x="{left + i * bar_w:.1f}" y="{y(c):.1f}" width="{max(bar_w - 1, 1):.1f}" '
        f'height="{10 + plot_h - y(c):.1f}"><title>impact {fmt(edges[i])}–{fmt(edges[i + 1])}: '
        f"{c} samples</title></rect>"
        for i, c in enumerate(counts.tolist())
        if c
    )
    # Ticks at whole powers of ten (1, 10, 100 ...): a count axis never shows "0.5 samples"; the
    # axis starts at 0 counts, unlabelled (a "0" would sit on the "1").
    tick_counts = [10**p for p in range(int(y_max) + 1) if math.log10(1 + 10**p) <= y_max]
    ticks = "".join(
        f'<line x1="{left - 4}" x2="{left}" y1="{y(c):.1f}" y2="{y(c):.1f}"/>'
        f'<text x="{left - 6}" y="{y(c) + 4:.1f}" text-anchor="end" stroke="none">{c:,}</text>'
        for c in tick_counts
    )
    base = 10 + plot_h
    x_ticks = "".join(
        f'<text x="{left + f * plot_w:.1f}" y="{base + 14}" text-anchor="middle">'
        f"{fmt(f * edges[-1])}</text>"
        for f in (0.0, 0.5, 1.0)
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="impact histogram" font-size="10">'
        f'<g fill="#4a7fb0">{bars}</g><g stroke="#555">{ticks}'
        f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}"/></g>{x_ticks}'
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle">impact</text>'
        f'<text x="10" y="{10 + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 10 {10 + plot_h / 2:.1f})">samples (log)</text></svg>'
    )


def sparkline(values: np.ndarray, height: int = 22) -> str:
    """The impact histogram in a table cell: one path, log counts, no axes. Whole-pixel
    coordinates keep the path short: a thousand rows cost about 0.4 MB."""
    top = float(values.max()) if values.size else 0.0
    counts, _ = np.histogram(values, bins=SPARK_BINS, range=(0.0, top if top > 0 else 1.0))
    scale = math.log10(1 + max(int(counts.max()), 1))
    path = "".join(
        f"M{4 * i} {height}v-{h}h3v{h}"
        for i, c in enumerate(counts.tolist())
        if c and (h := max(round(height * math.log10(1 + c) / scale), 1))
    )
    return (
        f'<svg width="{4 * SPARK_BINS}" height="{height}" role="img" aria-label="impact '
        f'histogram"><path d="{path}" fill="#4a7fb0"/></svg>'
    )


def input_bars(x: np.ndarray, n_labels: int = 8, height: int = 44) -> str:
    """An input vector as bars (around zero when it has negative entries); the largest |x_j|
    (the active features of sparse data) are labelled with their index j, every bar carries its
    value as a hover title."""
    n = x.size
    bar_w = max(3.0, min(18.0, 360 / max(n, 1)))
    width = int(bar_w * n) + 4
    scale = float(np.abs(x).max()) or 1.0
    signed = bool((x < 0).any())
    top, bottom = 11, height - (11 if signed else 1)
    zero = (top + bottom) / 2 if signed else bottom
    reach = zero - top
    order = np.argsort(-np.abs(x), kind="stable")
    labelled = {int(j) for j in order[:n_labels] if x[j] != 0}
    parts = []
    for j, v in enumerate(x.tolist()):
        if v == 0:  # sparse inputs: only active features get a bar (and bytes on the page)
            continue
        h = reach * abs(v) / scale
        y = zero - h if v >= 0 else zero
        colour = "#b2182b" if v >= 0 else "#2166ac"
        parts.append(
            f'<rect x="{2 + j * bar_w:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{max(h, 0.5):.1f}" fill="{colour}"><title>feature {j}: {fmt(v)}</title>'
            "</rect>"
        )
        if j in labelled:
            ty = y - 2 if v >= 0 else y + h + 9
            parts.append(
                f'<text x="{2 + (j + 0.5) * bar_w:.1f}" y="{ty:.1f}" text-anchor="middle">{j}'
                "</text>"
            )
    return (
        f'<svg class="bars" width="{width}" height="{height}" font-size="9" role="img" '
        f'aria-label="input vector"><line x1="0" x2="{width}" y1="{zero}" y2="{zero}" '
        f'stroke="#999"/>{"".join(parts)}</svg>'
    )


def colour_bar(low: float, high: float, height: int = 160, cmap: str = "RdBu_r") -> str:
    """A vertical colour bar from `low` (bottom) to `high` (top), labelled at both ends and 0."""
    steps = 32
    colours = colormaps[cmap](np.linspace(1, 0, steps), bytes=True)[:, :3]
    h = (height - 20) / steps
    rects = "".join(
        f'<rect x="0" y="{10 + i * h:.2f}" width="12" height="{h + 0.3:.2f}" '
        f'fill="#{r:02x}{g:02x}{b:02x}"/>'
        for i, (r, g, b) in enumerate(colours.tolist())
    )
    labels: list[tuple[float, float]] = [(10, high), (height - 10, low)]
    if low < 0 < high:
        labels.append((10 + (height - 20) * high / (high - low), 0.0))
    text = "".join(f'<text x="16" y="{y + 4:.1f}">{e(fmt(v))}</text>' for y, v in labels)
    return (
        f'<svg class="cbar" width="64" height="{height}" font-size="10" role="img" '
        f'aria-label="colour scale">{rects}{text}</svg>'
    )
