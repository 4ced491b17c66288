"""Soak: one `l3d decompose` run killed with SIGKILL 20 times at random moments (mid-epoch, mid
metric line, mid checkpoint write, while the folder's lock is held), each time continued with
`l3d decompose --resume`, ends bit-identical to a run that was never stopped: the same factors and
the same metric lines (timing fields aside). Drives real processes as tests/test_resume.py does."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from l3d import runs
from test_resume import ENV, TINY, _checkpoint_epoch, _cli, _factors

N_KILLS = 20
EPOCHS = 400
TIMING = {"time", "elapsed", "seconds"}


def _soak_config(tmp_path: Path) -> Path:
    spec = json.loads(json.dumps(TINY))
    spec["data"]["options"]["n_samples"] = 256  # 8 steps an epoch
    spec["l3d"].update(epochs=EPOCHS, resample_every=5, resample_until=300)
    spec["run"] = {"checkpoint_seconds": 0, "progress": False}
    path = tmp_path / "soak.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _kill_after_progress(argv: list[str], run_dir: Path, rng: random.Random) -> int:
    """Start `l3d` with argv, wait until its checkpoint passes the one it started from, then
    SIGKILL it after a random 0-30 ms; returns the epoch checkpointed before the kill."""
    start = _checkpoint_epoch(run_dir)
    proc = subprocess.Popen(
        _cli(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 120
    while _checkpoint_epoch(run_dir) <= start:
        assert proc.poll() is None, f"ended before its kill: {proc.communicate()[1]}"
        assert time.time() < deadline, "no progress"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return _checkpoint_epoch(run_dir)


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_twenty_sigkills_then_resumes_end_bit_identical(tmp_path):
    config = _soak_config(tmp_path)
    reference = tmp_path / "reference"
    runs.execute(runs.create_run(runs.load_spec(config), reference), progress=False, log=print)

    rng = random.Random(12)
    killed = tmp_path / "killed"
    epochs = [_kill_after_progress(["decompose", str(config), "--out", str(killed)], killed, rng)]
    for _ in range(N_KILLS - 1):
        epochs.append(_kill_after_progress(["decompose", "--resume", str(killed)], killed, rng))
    assert epochs[-1] < EPOCHS and epochs == sorted(epochs), epochs
    done = subprocess.run(
        _cli("decompose", "--resume", str(killed), "-q"),
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr

    mine, theirs = _factors(killed), _factors(reference)
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
    lines = runs.RunDir(killed).metrics_records()
    assert [r["epoch"] for r in lines] == list(range(EPOCHS))
    assert _without_timing(lines) == _without_timing(runs.RunDir(reference).metrics_records())
    assert any("resampled" in r for r in lines)
