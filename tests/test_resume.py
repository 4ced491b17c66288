"""A run stopped by a real signal (SIGTERM, Ctrl-C's SIGINT, SIGKILL) and resumed with
`l3d decompose --resume` ends with the same factors as a run that was never stopped, resampling of
dead subnetworks included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from l3d import io, runs
from l3d.cli import main
from l3d.decomposition import build

TINY = {
    "model": {"python": "l3d.toys:TMS", "options": {"n_features": 5, "n_hidden": 2}},
    "data": {"toy": "tms", "options": {"n_samples": 128, "seed": 1}},
    "l3d": {
        "params": ["W_in", "W_out", "b"],
        "n_subnetworks": 5,
        "epochs": 60,
        "batch_size": 32,
        "lr": 0.01,
        "seed": 3,
        # Resampling runs between epochs (epochs 15 and 20 here): a resumed run must replay it.
        "resample_every": 5,
        "resample_until": 40,
    },
    "run": {"checkpoint_seconds": 0, "progress": False},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine their spin-waits
    make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path: Path, **l3d_changes) -> Path:
    spec = json.loads(json.dumps(TINY))
    spec["l3d"].update(l3d_changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "l3d.cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _checkpoint_epoch(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _start_and_stop(config: Path, run_dir: Path, sig: signal.Signals, after_epoch: int = 3):
    """Start `l3d decompose` in a real process, send `sig` once it has checkpointed a few epochs."""
    proc = subprocess.Popen(
        _cli("decompose", str(config), "--out", str(run_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.time() + 120
    while _checkpoint_epoch(run_dir) < after_epoch and proc.poll() is None:
        assert time.time() < deadline, "the run never reached its first checkpoints"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _factors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "decomposition" / "subnetworks.safetensors"))


def _uninterrupted(config: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    spec = runs.load_spec(config)
    runs.execute(runs.create_run(spec, run_dir), progress=False, log=lambda m: None)
    return _factors(run_dir)


def _assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = _factors(resumed), _factors(reference)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    lines = runs.RunDir(resumed).metrics_records()
    expected = runs.RunDir(reference).metrics_records()
    assert [r["epoch"] for r in lines] == list(range(TINY["l3d"]["epochs"]))
    for mine, theirs in zip(lines, expected):
        assert mine["loss_paper"] == theirs["loss_paper"]
        assert mine["step"] == theirs["step"]
        assert mine.get("resampled") == theirs.get("resampled")
    assert any("resampled" in r for r in lines)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    _uninterrupted(_config(folder), folder / "run")
    return folder / "run"


def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path, reference_run):
    config = _config(tmp_path)
    stopped = tmp_path / "stopped"
    code, err = _start_and_stop(config, stopped, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert f"l3d decompose --resume {stopped}" in err
    epoch = _checkpoint_epoch(stopped)
    assert 3 <= epoch < TINY["l3d"]["epochs"]
    assert not (stopped / "decomposition").exists()

    resumed = subprocess.run(
        _cli("decompose", "--resume", str(stopped)),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {stopped} from epoch {epoch}" in resumed.stderr
    _assert_same_run(stopped, reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_or_ctrl_c_then_resume_matches_uninterrupted_run(tmp_path, reference_run, sig):
    config = _config(tmp_path)
    stopped = tmp_path / "stopped"
    code, err = _start_and_stop(config, stopped, sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGINT), err
    resumed = subprocess.run(
        _cli("decompose", "--resume", str(stopped), "--quiet"),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(stopped, reference_run)


def test_checkpoint_round_trip_restores_trainer_exactly(tmp_path, monkeypatch):
    """flatten -> safetensors + JSON -> unflatten gives a trainer that continues bit-identically,
    and a kill while a later checkpoint is written leaves this one in force."""
    spec = runs.RunSpec.create(TINY)
    model = runs.build_model(spec.model)
    data = runs.build_data(spec.data, spec.model)
    config = spec.l3d.replace(epochs=4)
    _, _, trainer = build(model, data, config)
    for _ in range(2):
        trainer.run_epoch()
    runs.save_checkpoint(tmp_path, *runs.flatten_state(trainer.state_dict()))
    _, _, restored = build(model, data, config)
    restored.load_state_dict(runs.load_checkpoint(tmp_path))
    assert restored.epoch == trainer.epoch == 2 and restored.step == trainer.step
    assert restored.history == trainer.history
    for _ in range(2):
        assert trainer.run_epoch()["loss_paper"] == restored.run_epoch()["loss_paper"]
    for (name, a), b in zip(trainer.pair.state_dict().items(), restored.pair.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    def killed_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a safetensors file")
        raise KeyboardInterrupt  # the process dies before the rename

    monkeypatch.setattr(io, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(tmp_path, *runs.flatten_state(trainer.state_dict()))
    assert runs.load_checkpoint(tmp_path)["epoch"] == 2
    # Only the complete tensors file is left, and state.json names it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-000002.safetensors", "state.json"]


def test_resume_of_a_finished_run_says_so(reference_run, capsys):
    before = (reference_run / "decomposition" / "subnetworks.safetensors").read_bytes()
    assert main(["decompose", "--resume", str(reference_run)]) == 0
    assert "already finished" in capsys.readouterr().err
    assert (reference_run / "decomposition" / "subnetworks.safetensors").read_bytes() == before
