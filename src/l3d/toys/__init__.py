"""Toy models with known subnetworks (Section 3 of the paper, plus the peers' ResidMLP) and their
data."""

from l3d.toys.data import feature_groups, grouped_features, sparse_features
from l3d.toys.higher_rank import higher_rank_model
from l3d.toys.resid_mlp import ResidMLP, resid_mlp_labels
from l3d.toys.squares import Squares
from l3d.toys.tmcs import TMCS, coefficient_matrix
from l3d.toys.tms import TMS, feature_parameter_mask, train_toy

__all__ = [
    "TMCS",
    "TMS",
    "ResidMLP",
    "Squares",
    "coefficient_matrix",
    "feature_groups",
    "feature_parameter_mask",
    "grouped_features",
    "higher_rank_model",
    "resid_mlp_labels",
    "sparse_features",
    "train_toy",
]
