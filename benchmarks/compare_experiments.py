"""Compare two runs of the same toy experiments metric by metric, seed by seed.

Reads `metrics.json` under each experiment folder of two output folders of `l3d experiment`
(one folder per toy, as the suite writes them, or one toy's folder each) and prints, for every
summary metric with per-seed values, both runs' values and the largest per-seed difference. Used
to check that an option changes nothing that matters (e.g. `gram_precision=bfloat16`,
docs/performance.md):

    for p in float32 bfloat16; do
      l3d experiment tms --settings improved --seeds 0,1,2 --no-sweep --no-controls -q \\
          --set gram_precision=$p --out runs/gram/$p/tms
    done
    python benchmarks/compare_experiments.py runs/gram/float32 runs/gram/bfloat16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def experiments(root: Path) -> dict[str, dict]:
    """{experiment name: summary} of the metrics.json files at root or one level below."""
    files = [root / "metrics.json"] if (root / "metrics.json").exists() else []
    files += sorted(root.glob("*/metrics.json"))
    return {
        json.loads(f.read_text())["summary"]["experiment"]: json.loads(f.read_text())["summary"]
        for f in files
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--metrics", help="comma-separated metric names (default: all)")
    args = parser.parse_args()
    a, b = experiments(args.a), experiments(args.b)
    wanted = set(args.metrics.split(",")) if args.metrics else None
    for name in [n for n in a if n in b]:
        print(f"## {name}: {args.a} vs {args.b}")
        for metric, value in a[name].items():
            other = b[name].get(metric)
            if not (isinstance(value, dict) and isinstance(other, dict) and "values" in value):
                continue
            if wanted is not None and metric not in wanted:
                continue
            va, vb = value["values"], other["values"]
            diff = max(abs(x - y) for x, y in zip(va, vb))
            print(
                f"{metric:60s} {' '.join(f'{x:9.4g}' for x in va)} | "
                f"{' '.join(f'{y:9.4g}' for y in vb)} | max diff {diff:.3g}"
            )


if __name__ == "__main__":
    main()
