"""Toy models with known subnetworks (Section 3 of the paper) and their data."""

from l3d.toys.data import sparse_features
from l3d.toys.tms import TMS, feature_parameter_mask, train_toy

__all__ = ["TMS", "feature_parameter_mask", "sparse_features", "train_toy"]
