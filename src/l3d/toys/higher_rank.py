"""Higher-rank circuits (Section 3.3): the TMCS model on inputs whose features are active in groups.

Features 0-4, 5-9, ... are active or inactive together, so each circuit spans a group's encoder
columns and is rank up to the group size. Paper: 25 inputs in 5 groups; authors' code: 30 in 6
with 10 hidden. We use 10 hidden in both variants (the paper does not state the width).
"""

from __future__ import annotations

from l3d.toys.tmcs import TMCS

PAPER = {"n_groups": 5, "group_size": 5, "n_hidden": 10}
CODE = {"n_groups": 6, "group_size": 5, "n_hidden": 10}


def higher_rank_model(n_groups: int, group_size: int, n_hidden: int, seed: int = 0) -> TMCS:
    n = n_groups * group_size
    return TMCS(n_inputs=n, n_hidden=n_hidden, n_outputs=n, seed=seed)
