"""Benchmarks that patch library internals, run end to end so that a library change cannot leave
them broken unnoticed (precision_check.py turns off the float32 check for its float64 reference
run; a check added elsewhere once made it fail before printing anything)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_precision_check_finds_one_float32_step_close_to_float64():
    done = subprocess.run(
        [sys.executable, "benchmarks/precision_check.py", "--setting", "c"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(
        r"Gram in (\w+)\s*\) loss rel\. error (\S+), factor-gradient rel\. error (\S+)",
        done.stdout,
    )
    assert len(rows) >= 2, done.stdout
    for gram, loss, grads in rows:
        # float32 against float64: round-off; a bfloat16 Gram: its 8-bit mantissa (2^-7) at most.
        assert float(loss) < 1e-5, (gram, loss)
        assert float(grads) < (1e-5 if gram == "float32" else 1e-2), (gram, grads)
