"""python -m l3d.experiments NAME|suite --seeds 0,1,2 --out DIR [--settings paper|improved] [--quick]
[--set KEY=VALUE ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l3d.errors import L3DError
from l3d.experiments.registry import EXPERIMENTS
from l3d.experiments.runner import parse_overrides, run_experiment
from l3d.experiments.suite import run_suite


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise L3DError(
            f"--seeds must be comma-separated integers, e.g. 0,1,2; got '{text}'"
        ) from None


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
        seeds = parse_seeds(args.seeds)
        overrides = parse_overrides(args.set)
        out = args.out or f"runs/experiments/{args.name}"
        if args.name == "suite":
            if overrides:
                raise L3DError("--set applies to one experiment, not the suite")
            run_suite(out, seeds, quick=args.quick, settings=args.settings or "improved")
            print(Path(out, "results.md").read_text())
        else:
            run_experiment(
                args.name,
                seeds,
                out,
                settings=args.settings or "paper",
                quick=args.quick,
                sweep=not args.no_sweep,
                overrides=overrides,
            )
            print(Path(out, "summary.md").read_text())
    except L3DError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
