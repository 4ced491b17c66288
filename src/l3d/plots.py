"""Every figure of l3d: training curves, P_act, subnetwork diagrams, image grids, interventions.

Drawn with matplotlib's object API (`Figure`, no pyplot): no global backend is set or needed, so
nothing opens a window and a notebook's own backend is left alone. A figure becomes a PNG file
(`save`, written atomically through l3d.io) or PNG bytes (`png`, for the HTML report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from l3d import io


def subplots(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **options: Any
) -> tuple[Figure, Any]:
    """A new figure and its axes, as `pyplot.subplots` gives them, without pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **options)


def save(fig: Figure, path: str | Path, dpi: int = 110, *, tight: bool = True) -> Path:
    """Write `fig` to the PNG file `path` atomically, laid out tightly first unless tight=False."""
    if tight:
        fig.tight_layout()
    io.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    return Path(path)


def png(fig: Figure) -> bytes:
    """`fig` as PNG bytes, cropped to its content (images embedded in the report)."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


# P_act -----------------------------------------------------------------------------------------


def p_active_figure(
    p_active: Tensor | np.ndarray, *, sort: bool = True, histogram: bool = False
) -> Figure:
    """P_act of each subnetwork as bars, dead ones (P_act = 0) in red; largest first when sort,
    else by index. histogram: a histogram of P_act beside the bars."""
    values = np.asarray(p_active)
    if sort:
        values = np.sort(values)[::-1]
    width = max(4.0, 0.06 * len(values) + 2)
    fig, axes = subplots(1, 1 + histogram, figsize=(width + 4 * histogram, 3), squeeze=False)
    if histogram:
        axes[0, 0].hist(values, bins=min(50, max(10, len(values) // 2)), color="tab:blue")
        axes[0, 0].set_xlabel("P_act")
        axes[0, 0].set_ylabel("subnetworks")
        # Counts: never a "0.5 subnetworks" tick.
        axes[0, 0].yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax = axes[0, -1]
    colors = ["tab:red" if v == 0 else "tab:blue" for v in values]
    ax.bar(np.arange(len(values)), values, color=colors, width=0.9)
    order = "sorted by P_act" if sort else "by index"
    ax.set_xlabel(f"subnetwork ({order}; dead in red)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("P_act")
    return fig


def plot_p_active(p_active: Tensor | np.ndarray, path: str | Path, *, sort: bool = False) -> Path:
    """The P_act figure (`p_active_figure`, without histogram) as a PNG file."""
    return save(p_active_figure(p_active, sort=sort), path)


# Training --------------------------------------------------------------------------------------


def plot_training_curve(history: list[dict], path: str | Path, title: str = "L3D training") -> Path:
    """Both loss forms per epoch (log scale) with the learning rate on a twin axis."""
    epochs = [r["epoch"] for r in history]
    fig, ax = subplots(figsize=(6, 3.5))
    ax.plot(epochs, [r["loss_paper"] for r in history], label="paper: mean ‖g−ĝ‖/‖g‖")
    ax.plot(
        epochs, [r["loss_pooled_squared"] for r in history], label="pooled squared Σ‖g−ĝ‖²/Σ‖g‖²"
    )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("reconstruction loss")
    ax.set_title(title)
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [r["lr"] for r in history], color="grey", lw=0.8, ls=":", label="lr")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate", color="grey")
    ax.legend(loc="upper right", fontsize=8)
    return save(fig, path, dpi=120)


def loss_curves_figure(records: list[dict]) -> Figure:
    """Both losses (log scale) and live subnetworks per epoch."""
    fig, (ax, ax_live) = subplots(1, 2, figsize=(8, 3))
    epochs = [r["epoch"] + 1 for r in records]
    for key, label in (("loss_paper", "paper (eq. 8)"), ("loss_pooled_squared", "pooled squared")):
        values = [r[key] for r in records]
        ax.plot(epochs, values, label=label)
    if records and all(r["loss_paper"] > 0 and r["loss_pooled_squared"] > 0 for r in records):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss")
    ax.legend()
    ax_live.plot(epochs, [r["live_subnetworks"] for r in records], color="tab:green")
    ax_live.set_xlabel("epoch")
    ax_live.set_ylabel("live subnetworks")
    for axis in (ax.xaxis, ax_live.xaxis, ax_live.yaxis):  # epochs and counts are whole numbers
        axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    return fig


# Subnetworks -----------------------------------------------------------------------------------


def _draw_layer(ax, weight: Tensor, x0: float, x1: float, y_in, y_out, scale: float) -> None:
    for i, yo in enumerate(y_out):
        for j, yi in enumerate(y_in):
            w = float(weight[i, j])
            if abs(w) > 1e-3 * scale:
                ax.plot(
                    [x0, x1],
                    [yi, yo],
                    color="tab:red" if w > 0 else "tab:blue",
                    lw=4 * abs(w) / scale,
                    alpha=0.8,
                    solid_capstyle="round",
                )


def plot_mlp_subnetworks(
    directions: list[dict[str, Tensor]],
    layers: list[tuple[str, str | None]],
    path: str | Path,
    titles: list[str] | None = None,
) -> Path:
    """Each subnetwork as a network diagram: nodes per layer, an edge per weight (width = |w|,
    red > 0, blue < 0), node rings for biases. layers: (weight name (out, in), bias name or None)
    in forward order."""
    n = len(directions)
    fig, axes = subplots(1, n, figsize=(2.4 * n, 3.2), squeeze=False)
    for k, (ax, v) in enumerate(zip(axes[0], directions)):
        scale = max(float(t.abs().max()) for t in v.values()) or 1.0
        sizes = [v[layers[0][0]].shape[1]] + [v[w].shape[0] for w, _ in layers]

        def ys(m: int) -> list[float]:  # index 0 at the top
            return [((m - 1) / 2 - i) for i in range(m)]

        for li, (w_name, b_name) in enumerate(layers):
            _draw_layer(ax, v[w_name], li, li + 1, ys(sizes[li]), ys(sizes[li + 1]), scale)
            if b_name is not None:
                for y, b in zip(ys(sizes[li + 1]), v[b_name]):
                    ax.scatter(
                        [li + 1],
                        [y],
                        s=300 * abs(float(b)) / scale + 1,
                        facecolors="none",
                        edgecolors="tab:red" if b > 0 else "tab:blue",
                        lw=2,
                    )
        for li, m in enumerate(sizes):
            ax.scatter([li] * m, ys(m), s=30, color="black", zorder=3)
        for end, side, prefix in ((0, "right", "x"), (len(sizes) - 1, "left", "y")):
            for i, y in enumerate(ys(sizes[end])):
                offset = -0.12 if side == "right" else 0.12
                ax.text(end + offset, y, f"{prefix}{i}", ha=side, va="center", fontsize=7)
        ax.set_title(titles[k] if titles else f"subnetwork {k}", fontsize=9)
        ax.axis("off")
    return save(fig, path, dpi=120)


# Images ----------------------------------------------------------------------------------------


def _displayable(image: Tensor) -> np.ndarray:
    """A (channels, height, width) image scaled to [0, 1] (inputs are often normalised), as
    (height, width) for one channel or (height, width, channels)."""
    x = image.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def save_image(image: Tensor, path: str | Path) -> Path:
    """One input image as a PNG file, one pixel per entry (grey for one channel)."""
    array = _displayable(image)
    cmap = "gray" if array.ndim == 2 else None
    io.atomic_write(path, lambda p: imsave(p, array, cmap=cmap, format="png"))
    return Path(path)


def plot_image_grid(
    images: Sequence[Tensor], titles: Sequence[str], path: str | Path, title: str
) -> Path:
    """Images in rows of at most five, each with its title, under one heading."""
    cols = min(5, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, titles):
        ax.imshow(_displayable(image), cmap="gray")
        ax.set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


# Interventions ---------------------------------------------------------------------------------


def intervention_figure(result: dict) -> Figure:
    """Output change per sample for each delta, samples ordered by the subnetwork's impact
    (most affected first), as in the paper's intervention figures (Section 3, Figure 3).
    result: as `l3d intervene` saves it (subnetwork, divergence, deltas, impact, change)."""
    impact = np.asarray(result["impact"])
    order = np.argsort(-impact, kind="stable")
    change = np.asarray(result["change"])[:, order]
    fig, (ax, ax_impact) = subplots(1, 2, figsize=(8, 3))
    cmap = colormaps["viridis"]
    n = len(result["deltas"])
    for i, (delta, row) in enumerate(zip(result["deltas"], change)):
        color = cmap(i / max(n - 1, 1))
        ax.plot(np.arange(len(row)), row, ".", markersize=3, color=color, label=f"δ={delta:g}")
    ax.set_xlabel("sample, by impact (highest first)")
    ax.set_ylabel(f"output change ({result['divergence']})")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.legend(fontsize="small")
    ax_impact.plot(np.arange(len(order)), impact[order], color="black")
    ax_impact.set_xlabel("sample, by impact (highest first)")
    ax_impact.set_ylabel("impact I(x, v_k)")
    ax_impact.set_yscale("symlog", linthresh=1e-6)
    fig.suptitle(f"intervening on subnetwork {result['subnetwork']}")
    return fig


# Finetuning ------------------------------------------------------------------------------------


def finetune_tradeoff_figure(
    runs: list[dict],
    *,
    x: str,
    y: str,
    labels: dict[str, str],
    xlabel: str,
    ylabel: str,
    ylog: bool = True,
) -> Figure:
    """The trade-off of finetuning methods (l3d.finetuning): one line per run (method, learning
    rate, seed) through its evaluated checkpoints, x against y, one colour per method."""
    fig, ax = subplots(figsize=(6.5, 4.5))
    cmap = colormaps["tab10"]
    for i, (method, label) in enumerate(labels.items()):
        mine = [r for r in runs if r["method"] == method]
        for j, run in enumerate(mine):
            xs = [p[x] for p in run["curve"]]
            ys = [p[y] for p in run["curve"]]
            ax.plot(xs, ys, "-", marker=".", markersize=3, lw=0.8, alpha=0.7, color=cmap(i),
                    label=label if j == 0 else None)  # fmt: skip
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    return fig


def adapter_history_figure(histories: dict[str, list[dict]]) -> Figure:
    """Finetuning adapters' training (l3d.finetuning `history`), one colour per adapter: the
    objective per step, and, for adapters with a retain term, the trade-off of objective against
    retain distance along the steps (the first step circled)."""
    with_retain = {n: h for n, h in histories.items() if h and "retain_distance" in h[0]}
    fig, axes = subplots(1, 2 if with_retain else 1, figsize=(9 if with_retain else 4.5, 3.2))
    left = axes[0] if with_retain else axes
    cmap = colormaps["tab10"]
    colours = {name: cmap(i % 10) for i, name in enumerate(histories)}
    for name, history in histories.items():
        left.plot([r["step"] for r in history], [r["objective"] for r in history], lw=1,
                  color=colours[name], label=name)  # fmt: skip
    left.set_xlabel("step")
    left.set_ylabel("objective (target data)")
    left.legend(fontsize="small")
    if with_retain:
        right = axes[1]
        for name, history in with_retain.items():
            xs = [r["retain_distance"] for r in history]
            ys = [r["objective"] for r in history]
            right.plot(xs, ys, lw=1, marker=".", markersize=2, color=colours[name])
            right.plot(xs[:1], ys[:1], "o", mfc="none", color=colours[name])
        right.set_xlabel("retain distance (to the frozen model)")
        right.set_ylabel("objective")
        right.set_title("trade-off along the steps", fontsize="small")
        right.xaxis.set_major_locator(MaxNLocator(5))
        right.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    fig.set_layout_engine("constrained")
    return fig
