"""`l3d report RUN_DIR`: a static HTML report of a run, readable offline (no network, no CDN).

index.html with its images in img/ and assets/ beside it: an overview (loss curves, P_act
histogram, dead subnetworks, config) and one section per subnetwork (V_out heatmaps per tensor,
top samples or image grids, top logits of both signs, intervention plots), with navigation and
sorting by P_act. Every string that comes from data, tokenizers or configs is HTML-escaped.
"""

from l3d.report.page import write_report

__all__ = ["write_report"]
