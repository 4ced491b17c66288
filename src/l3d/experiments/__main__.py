"""python -m l3d.experiments NAME|suite --seeds 0,1,2 --out DIR [--settings paper|improved] [--quick]
[--set KEY=VALUE ...]"""

from __future__ import annotations

import argparse
import sys

from l3d.errors import L3DError
from l3d.experiments.registry import EXPERIMENTS
from l3d.experiments.suite import run_named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l3d.experiments", description=__doc__)
    parser.add_argument("name", help=f"one of {', '.join(EXPERIMENTS)}, or 'suite' for all")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None, help="output folder (default runs/experiments/NAME)")
    parser.add_argument(
        "--settings",
        choices=["paper", "improved"],
        default=None,
        help="paper (Appendix B.4) or improved; default paper, suite: improved",
    )
    parser.add_argument("--quick", action="store_true", help="a few epochs: a smoke test")
    parser.add_argument("--no-sweep", action="store_true", help="skip the rank / count sweep")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="replace one setting of the profile (an L3DConfig field), e.g. --set "
        "divergence=mse_authors --set top_k=0.2; repeatable; not for the suite",
    )
    args = parser.parse_args(argv)
    try:
        summary = run_named(
            args.name,
            args.seeds,
            args.out,
            settings=args.settings,
            quick=args.quick,
            sweep=not args.no_sweep,
            set_options=args.set,
        )
        print(summary.read_text())
    except L3DError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
