"""`python -m l3d.experiments ARGS` runs `l3d experiment ARGS` (see `l3d experiment --help`)."""

from __future__ import annotations

import sys

from l3d.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["experiment", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
