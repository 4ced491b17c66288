"""Image classifiers: input checks, rank presets per tensor, and the paper's mobilenet-v3-small run.

Any classifier mapping (n, C, H, W) images to (n, n_classes) logits works with divergence='kl'
(KL(p_ref ‖ p_i) over classes, Section 3.5.2). The model runs in eval mode during a decomposition,
so BatchNorm uses its running statistics and samples never interact. torchvision is optional
(`pip install l3d[vision]`) and imported only by `load_mobilenet_v3_small`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from l3d.config import L3DConfig, with_changes
from l3d.core.model import evaluating, select_parameters
from l3d.core.samples import check_finite
from l3d.errors import L3DError, lookup

# torchvision's ImageNet normalisation, used by its pretrained classifiers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_tensor(
    images: Tensor | np.ndarray,
    *,
    mean: Iterable[float] | None = None,
    std: Iterable[float] | None = None,
) -> Tensor:
    """Images as a float (n, C, H, W) tensor.

    Accepts (n, C, H, W) or channels-last (n, H, W, C) arrays (C in 1 or 3), uint8 in [0, 255]
    (scaled to [0, 1]) or floats used as given; then (x - mean) / std per channel if given.
    """
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "biuf":
            raise L3DError(f"images must be real numbers; got an array of {images.dtype}")
        images = torch.as_tensor(images)
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise L3DError(
            f"images have shape {shape}; pass a batch shaped (n, C, H, W) or (n, H, W, C), "
            "e.g. add a batch axis with images[None]"
        )
    if images.is_complex():
        raise L3DError(f"images must be real numbers; got a tensor of {str(images.dtype)[6:]}")
    if images.shape[0] == 0:
        raise L3DError("no images (the batch is empty): pass at least two")
    x = images
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    check_finite(x, "images")
    if mean is not None or std is not None:
        c = x.shape[1]
        m = _per_channel(mean, 0.0, c, "mean")
        s = _per_channel(std, 1.0, c, "std")
        if not (s > 0).all():
            raise L3DError(f"std must be positive in every channel; got {s.flatten().tolist()}")
        x = (x - m) / s
    return x.contiguous()


def _per_channel(values: Iterable[float] | None, default: float, c: int, name: str) -> Tensor:
    """One value per channel, shaped to broadcast over (n, C, H, W)."""
    if values is None:
        return torch.full((1, c, 1, 1), default)
    try:
        column = torch.tensor([float(v) for v in values])
    except (TypeError, ValueError):
        raise L3DError(
            f"{name} must be a sequence of {c} numbers (one per channel); got "
            f"{type(values).__name__} {values!r}"
        ) from None
    if column.numel() != c or not torch.isfinite(column).all():
        raise L3DError(
            f"{name} must be a sequence of {c} finite numbers (one per channel) for images with "
            f"{c} channels; got {column.tolist()}"
        )
    return column.view(1, c, 1, 1)


@torch.no_grad()
def check_classifier(model: nn.Module, images: Tensor) -> int:
    """Run the model on two images; a clear error if they do not fit it or it does not return
    (n, n_classes) logits. Returns n_classes."""
    try:
        with evaluating(model):
            out = model(images[:2])
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise L3DError(
            f"images of shape {tuple(images.shape[1:])} (C, H, W) do not fit the model: {first}. "
            "Resize or convert them to the input shape the model was trained on"
        ) from None
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise L3DError(
            f"an image classifier must return (n, n_classes) logits; this model returned {shape}"
        )
    return int(logits.shape[1])


def ranks_by_fraction(
    model: nn.Module, params: Iterable[str], fraction: float = 0.1
) -> dict[str, int]:
    """Rank per selected tensor: about `fraction` of its largest dimension, at least 1 (the
    authors' mobilenet run used ranks of about dim/10)."""
    if not 0 < fraction <= 1:
        raise L3DError(
            f"fraction must be in (0, 1] (of each tensor's largest dimension); got {fraction}"
        )
    tensors = dict(model.named_parameters())
    return {
        name: max(1, round(fraction * max(tensors[name].shape, default=1)))
        for name in select_parameters(model, params)
    }


@dataclass(frozen=True)
class VisionPreset:
    """A named L3D run on an image classifier."""

    model: str
    description: str
    dataset: str
    rank_fraction: float
    l3d: dict[str, Any] = field(default_factory=dict)

    def config(self, model: nn.Module, **changes: Any) -> L3DConfig:
        """The preset's L3DConfig for this model (ranks from its tensor shapes), any field
        overridden by `changes`. Fewer `epochs` than the preset's scale its warm start by the
        same factor (10 of 100 epochs: 1 of 10), unless `warm_start_epochs` is given too."""
        params = changes.get("params", self.l3d["params"])
        rank = ranks_by_fraction(model, params, self.rank_fraction)
        return L3DConfig.create(**with_changes({**self.l3d, "rank": rank}, changes))


PRESETS: dict[str, VisionPreset] = {
    # The paper's vision run as the authors' code ran it (docs/authors-code.md):
    # all 13 tensors of features.7 (about 22k parameters), eval-mode BatchNorm, KL over classes.
    "mobilenet-v3-small": VisionPreset(
        model="torchvision mobilenet_v3_small, ImageNet weights",
        description="mobilenet-v3-small block features.7, 100 subnetworks, ranks about dim/10 "
        "(Section 3.5.2)",
        dataset="10,000 CIFAR-100 images resized to 224x224, ImageNet-normalised",
        rank_fraction=0.1,
        l3d={
            "params": ("features.7.*",),
            "n_subnetworks": 100,
            "top_k": 0.1,
            "divergence": "kl",
            "reference": "random",
            "batch_size": 32,
            "lr": 0.005,
            "epochs": 100,
            "warm_start_epochs": 10,
        },
    ),
}


def get_preset(name: str) -> VisionPreset:
    return lookup(PRESETS, name, "vision preset")


def load_mobilenet_v3_small(weights: str | None = "DEFAULT") -> nn.Module:
    """torchvision's mobilenet_v3_small in eval mode (weights=None: random initialisation)."""
    try:
        from torchvision.models import mobilenet_v3_small
    except (ImportError, OSError, RuntimeError) as err:
        raise L3DError(
            f"the mobilenet preset needs torchvision, which cannot be imported here ({err}): "
            "pip install 'l3d[vision]' with a torchvision build matching your torch"
        ) from None
    return mobilenet_v3_small(weights=weights).eval()
