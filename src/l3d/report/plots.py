"""PNG figures of a run, as bytes. Uses matplotlib's object API (no pyplot), so no global backend
state is touched and nothing needs a display."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

# Heatmaps larger than this (per side) are max-|value| pooled down, so an embedding matrix of a
# language model still gives a small image in which every strong entry stays visible.
HEATMAP_MAX_SIDE = 400


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def loss_curves_png(records: list[dict]) -> bytes:
    """Both losses (log scale) and live subnetworks per epoch."""
    fig = Figure(figsize=(8, 3))
    ax, ax_live = fig.subplots(1, 2)
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
    return _png(fig)


def p_active_png(p_active: np.ndarray) -> bytes:
    """Histogram of P_act and P_act of each subnetwork in decreasing order."""
    fig = Figure(figsize=(8, 3))
    ax_hist, ax_rank = fig.subplots(1, 2)
    ax_hist.hist(p_active, bins=min(50, max(10, len(p_active) // 2)), color="tab:blue")
    ax_hist.set_xlabel("P_act")
    ax_hist.set_ylabel("subnetworks")
    ax_rank.bar(np.arange(len(p_active)), np.sort(p_active)[::-1], width=1.0, color="tab:blue")
    ax_rank.set_xlabel("subnetwork (sorted)")
    ax_rank.set_ylabel("P_act")
    return _png(fig)


def as_matrix(values: np.ndarray) -> np.ndarray:
    """A parameter tensor as 2-D: vectors as one row, >2-D (conv kernels) as (out, rest)."""
    if values.ndim == 0:
        return values.reshape(1, 1)
    if values.ndim == 1:
        return values.reshape(1, -1)
    return values.reshape(values.shape[0], -1)


def pool_max_abs(matrix: np.ndarray, max_side: int = HEATMAP_MAX_SIDE) -> np.ndarray:
    """Downsample to at most max_side per axis keeping, in each block, the entry of largest |.|."""
    rows, cols = matrix.shape
    fr, fc = -(-rows // max_side), -(-cols // max_side)
    if fr == 1 and fc == 1:
        return matrix
    padded = np.zeros((-(-rows // fr) * fr, -(-cols // fc) * fc), dtype=matrix.dtype)
    padded[:rows, :cols] = matrix
    blocks = padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(blocks.shape[0], blocks.shape[2], fr * fc)
    pick = np.abs(blocks).argmax(-1)
    return np.take_along_axis(blocks, pick[..., None], -1)[..., 0]


def heatmap_png(values: np.ndarray, scale: float) -> bytes:
    """One tensor of a subnetwork as a red (+) / blue (-) image, one pixel per entry, symmetric
    colour scale [-scale, scale] so tensors of the same subnetwork compare. A 256-colour palette
    PNG: a third of the size of RGBA for the same picture."""
    from PIL import Image

    matrix = pool_max_abs(as_matrix(values))
    scale = scale if scale > 0 else 1.0
    index = np.clip(np.rint((matrix / scale + 1) * 127.5), 0, 255).astype(np.uint8)
    image = Image.fromarray(index)  # mode L; putpalette turns it into P
    palette = colormaps["RdBu_r"](np.linspace(0, 1, 256), bytes=True)[:, :3]
    image.putpalette(palette.flatten().tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def intervention_png(result: dict) -> bytes:
    """Output change per sample for each delta, samples ordered by the subnetwork's impact
    (most affected first), as in the paper's intervention figures (Section 3, Figure 3)."""
    impact = np.asarray(result["impact"])
    order = np.argsort(-impact, kind="stable")
    change = np.asarray(result["change"])[:, order]
    fig = Figure(figsize=(8, 3))
    ax, ax_impact = fig.subplots(1, 2)
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
    return _png(fig)
