"""The algorithm's core (paper Sections 2.2-2.5): no I/O, plotting or command line.

Layers, lowest first: distributed -> samples -> model -> divergences -> subnetworks -> gradients ->
algorithm -> resampling -> trainer. Each module imports only those before it (`distributed`, the
process group of a data-parallel run, imports none of them).
"""
