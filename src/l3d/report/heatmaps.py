"""V_out heatmaps for the report: one pixel per entry of a parameter tensor, as small palette PNGs.

Drawn with PIL rather than matplotlib (no axes, no resampling): the page scales them itself."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps

# Heatmaps larger than this (per side) are max-|value| pooled down, so an embedding matrix of a
# language model still gives a small image in which every strong entry stays visible.
HEATMAP_MAX_SIDE = 400


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
    grid = padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc)
    blocks = grid.transpose(0, 2, 1, 3).reshape(grid.shape[0], grid.shape[2], fr * fc)
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
