"""Time the toy-experiment suite: seconds per experiment (toy training from a cold cache is timed
separately from L3D and metrics), and the whole suite against the 15-minute budget on 2 cores.

    python benchmarks/toy_suite.py --seeds 0,1,2 --out runs/bench/toy_suite [--settings improved]

Prints one line per experiment and the total; writes out/bench.json. Toy training is cached
(L3D_CACHE or ~/.cache/l3d), so run twice to see the warm-cache time the budget refers to.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from l3d.experiments import run_experiment
from l3d.experiments.suite import SUITE_ORDER, results_table

BUDGET_SECONDS = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/bench/toy_suite")
    parser.add_argument("--settings", default="improved", choices=["paper", "improved"])
    parser.add_argument("--experiments", default=",".join(SUITE_ORDER))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()}")
    rows, summaries, seconds = {}, {}, {}
    for name in args.experiments.split(","):
        start = time.perf_counter()
        report = run_experiment(name, seeds, out / name, settings=args.settings, progress=False)
        total = time.perf_counter() - start
        parts = {
            k: sum(r["seconds"][k] for r in report["seeds"]) for k in report["seeds"][0]["seconds"]
        }
        rows[name] = {"total": total, **parts}
        summaries[name], seconds[name] = report["summary"], total
        print(
            f"{name:12s} total {total:7.1f} s  toy {parts['toy']:6.1f}  l3d {parts['l3d']:6.1f}  "
            f"metrics+sweep {parts['metrics_and_sweep']:6.1f}",
            flush=True,
        )
    grand = sum(r["total"] for r in rows.values())
    print(
        f"suite total {grand:.1f} s for {len(seeds)} seeds "
        f"({grand / BUDGET_SECONDS:.2f} of the 15-minute budget)"
    )
    print(results_table(summaries, seconds))
    (out / "bench.json").write_text(
        json.dumps({"seeds": seeds, "rows": rows, "total": grand}, indent=1)
    )


if __name__ == "__main__":
    main()
