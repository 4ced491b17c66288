"""`python -m l3d` runs the `l3d` command (so `torchrun -m l3d decompose CONFIG` launches it)."""

import sys

from l3d.cli import main

sys.exit(main())
