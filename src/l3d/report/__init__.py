"""`l3d report RUN_DIR`: a static HTML dashboard of a run, readable offline (no network, no CDN).

index.html: the run's numbers, losses, P_act and co-activation, and one sortable, searchable row
per subnetwork (P_act, mean impact, dead, matched ground-truth unit for toys, an impact sparkline,
top tokens / labels / features, selectivity). subnetworks/K.html: one page per subnetwork (impact
histogram, top and quantile examples with whole-context shading, outputs it moves, interventions
with their noise floor, co-active and similar subnetworks, V_out heatmaps). Every string that
comes from data, tokenizers or configs is HTML-escaped.
"""

from l3d.report.page import headline, write_report

__all__ = ["headline", "write_report"]
