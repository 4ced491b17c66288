"""Library defaults on the suite's toys (docs/toys.md, "Library defaults"): l3d.decompose with only
the decomposed tensors (all of the toy's) and the rank of the toy's profile given, so that
n_subnetworks is chosen from the gradients and every other setting is the library default
(`--set settings=paper`: the paper's); then the suite's own held-out metrics
(l3d.experiments.runner.measure). One JSON line per seed.

    OMP_NUM_THREADS=1 python benchmarks/toy_defaults.py tms --seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/toy_defaults.py tms --set settings=paper --stability
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import l3d
from l3d import controls
from l3d.experiments.registry import N_DECOMPOSE, get_spec
from l3d.experiments.runner import measure, parse_overrides, parse_seeds, settings_for
from l3d.toys.registry import train_toy_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("toy", help="an experiment of the suite: tms, tms40, tmcs, ...")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one L3DConfig field from its default (repeatable), e.g. --set top_k=0.2",
    )
    parser.add_argument(
        "--stability",
        action="store_true",
        help="also decompose from seed + 1 and report the cross-seed MMCS of the live subnetworks",
    )
    args = parser.parse_args()
    changes = parse_overrides(args.set)
    torch.set_num_threads(1)
    spec = get_spec(args.toy)
    rank = settings_for(spec, "improved", False)["rank"]
    for seed in parse_seeds(args.seeds):
        toy = train_toy_model(spec.toy, seed)
        # The suite's inputs and held-out samples for this seed.
        inputs = toy.sample(N_DECOMPOSE, torch.Generator().manual_seed(seed + 10_000))
        params = [name for name, _ in toy.model.named_parameters()]
        start = time.perf_counter()
        d = l3d.decompose(
            toy.model, inputs, params=params, rank=rank, seed=seed, progress=False, **changes
        )
        seconds = time.perf_counter() - start
        m = measure(spec, toy, d, seed)
        recovery = m["recovery"]
        row = {
            "toy": args.toy,
            "changes": changes,
            "seed": seed,
            "n_subnetworks": d.n_subnetworks,
            "dead": len(d.dead_subnetworks),
            "heldout_loss_pooled_squared": m["heldout"]["loss_pooled_squared"],
            "n_units": int(toy.units.shape[0]),
            "units_at_share": recovery["n_recovered_at"],
            "min_matched_share": min(recovery["matched_share"]),
            "probe_errors": (m.get("one_hot_probe") or {}).get("errors"),
            "pearson_r": (m.get("coefficients") or {}).get("pearson_r"),
            "l3d_seconds": seconds,
        }
        if args.stability:
            again = l3d.decompose(
                toy.model, inputs, params=params, rank=rank, seed=seed + 1, progress=False,
                **changes,
            )  # fmt: skip
            found = controls.decomposition_stability(d, again)
            row["cross_seed_mmcs"], row["cross_seed_min"] = found["mmcs"], found["min"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
