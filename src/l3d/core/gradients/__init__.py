"""Per-sample gradients: the batch protocol, three backends and the source that chooses one."""

from l3d.core.gradients.batch import ChunkedGradients, DenseGradients, GradientBatch, all_zero
from l3d.core.gradients.source import BatchMemory, GradientSource, Method
from l3d.core.gradients.torchfunc import per_sample_gradients

__all__ = [
    "BatchMemory",
    "ChunkedGradients",
    "DenseGradients",
    "GradientBatch",
    "GradientSource",
    "Method",
    "all_zero",
    "per_sample_gradients",
]
