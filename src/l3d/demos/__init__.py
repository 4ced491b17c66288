"""Trained demonstrations that run here without downloads, each one command:

- `python -m l3d.demos.digits_cnn --out DIR`: a mobilenet-style CNN on scikit-learn's digits;
- `python -m l3d.demos.synthetic_transformer --out DIR`: a small transformer on known tasks.

Each trains its model, decomposes one block, analyses the subnetworks (l3d.analysis) and reports
how pure each subnetwork's top-impact samples are against random directions of the same rank.
"""
