"""The paper's toy experiments (Section 3) plus the peers' ResidMLP, one call each, with
ground-truth metrics on held-out samples, figures and multi-seed summaries.

    from l3d.experiments import run_experiment
    run_experiment("tms", seeds=[0, 1, 2], out_dir="runs/tms", settings="improved")

or `l3d experiment tms --seeds 0,1,2 --out runs/tms`.
"""

from l3d.experiments.registry import EXPERIMENTS, ExperimentSpec
from l3d.experiments.runner import parse_overrides, run_experiment
from l3d.experiments.suite import run_named, run_suite

__all__ = [
    "EXPERIMENTS",
    "ExperimentSpec",
    "parse_overrides",
    "run_experiment",
    "run_named",
    "run_suite",
]
