"""The hand-set solution of each toy (docs/toys.md, "The hand-set solution"): one subnetwork per
unit (and sign) set to that unit's exact gradient direction, scored by the suite's own purity
metrics (l3d.experiments.runner.hand_set) on the suite's held-out samples. One JSON line per seed.

    OMP_NUM_THREADS=1 python benchmarks/hand_set.py tms --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json

import torch

from l3d.experiments.registry import N_DECOMPOSE, get_spec
from l3d.experiments.runner import (
    decompose_toy,
    hand_set,
    parse_seeds,
    settings_for,
    unit_probe_pool,
)
from l3d.toys.registry import train_toy_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("toy", help="an experiment of the suite: tms, tms40, tmcs, ...")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = get_spec(args.toy)
    fields = settings_for(spec, "improved", quick=False)
    for seed in parse_seeds(args.seeds):
        toy = train_toy_model(spec.toy, seed)
        inputs = toy.sample(
            spec.inputs_for("improved"), torch.Generator().manual_seed(seed + 10_000)
        )
        # Only the profile's ranks, divergence, reference and top_k are used: one short epoch.
        like, _ = decompose_toy(toy, {**fields, "epochs": 1, "warm_start_epochs": 0}, seed, inputs)
        heldout = toy.sample(N_DECOMPOSE, torch.Generator().manual_seed(seed + 20_000))
        probes = unit_probe_pool(toy, heldout, seed)
        row = hand_set(toy, like, seed, heldout, probes)
        print(json.dumps({"toy": args.toy, "seed": seed, **row}), flush=True)


if __name__ == "__main__":
    main()
