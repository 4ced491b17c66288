"""What each subnetwork does on real data (Sections 2.5 and 3.5): impact, top samples, top logits,
P_act and interventions, written to a folder as JSON plus Markdown and PNG.

`quantities` computes (tensors in, tensors out); `writing` writes the folder (`write_analysis`).
Everything works in chunks of inputs, so any dataset fits in memory.
"""

from l3d.analysis.quantities import (
    InterventionEffect,
    generate,
    intervention_effect,
    pair_impacts,
    random_samples,
    sample_labels,
    top_logits,
    top_sample_purity,
    top_samples,
)
from l3d.analysis.writing import AnalysisOptions, write_analysis

__all__ = [
    "AnalysisOptions",
    "InterventionEffect",
    "generate",
    "intervention_effect",
    "pair_impacts",
    "random_samples",
    "sample_labels",
    "top_logits",
    "top_sample_purity",
    "top_samples",
    "write_analysis",
]
