"""l3d: Local Loss Landscape Decomposition (Chrisman, Bushnaq, Sharkey 2025).

Decompose a trained model's parameters into low-rank subnetworks such that, for any sample, a few of
them reconstruct the gradient of a divergence between that sample's output and a reference output.
"""

from l3d.config import L3DConfig
from l3d.decomposition import Decomposition, decompose, load, run
from l3d.errors import L3DError
from l3d.finetuning import Adapter, finetune
from l3d.pairs import decompose_pairs

__all__ = [
    "Adapter",
    "Decomposition",
    "L3DConfig",
    "L3DError",
    "decompose",
    "decompose_pairs",
    "finetune",
    "load",
    "run",
]
__version__ = "0.1.0"
