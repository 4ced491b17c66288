"""Trained demonstrations that run here without downloads, each one command:

- `python -m l3d.demos.tms --out DIR` (`make demo`): the README's main job, the toy model of
  superposition decomposed with the project's improved settings and, beside it, the paper's,
  each subnetwork matched to its feature;
- `python -m l3d.demos.digits_cnn --out DIR`: a mobilenet-style CNN on scikit-learn's digits;
- `python -m l3d.demos.synthetic_transformer --out DIR`: a small transformer on known tasks.

The two real-model demos each train their model, decompose one block, analyse the subnetworks
(l3d.analysis) and report how pure each subnetwork's top-impact samples are against random
directions of the same rank.
"""
