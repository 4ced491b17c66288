"""Figures (matplotlib, Agg backend): training curves, P_act bars, subnetwork network diagrams."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor


def plot_training_curve(history: list[dict], path: str | Path, title: str = "L3D training") -> Path:
    """Both loss forms per epoch (log scale) with the learning rate on a twin axis."""
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [r["loss_paper"] for r in history], label="paper: mean ‖g−ĝ‖/‖g‖")
    ax.plot(
        epochs, [r["loss_pooled_squared"] for r in history], label="pooled squared Σ‖g−ĝ‖²/Σ‖g‖²"
    )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss")
    ax.set_title(title)
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [r["lr"] for r in history], color="grey", lw=0.8, ls=":", label="lr")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate", color="grey")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


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
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 3.2), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_p_active(p_active: Tensor, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(3, 0.35 * len(p_active)), 2.5))
    ax.bar(range(len(p_active)), p_active.tolist(), color="tab:green")
    ax.set_xlabel("subnetwork")
    ax.set_ylabel("P_act")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
