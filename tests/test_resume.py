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

from l3d import L3DError, io, runs
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


def _stopped_copy(reference_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished reference run as if stopped after its last checkpoint (no saved
    decomposition yet): `--resume` goes through the checkpoint."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy)
    shutil.rmtree(copy / "decomposition")
    return copy


def test_resume_refuses_a_config_edited_since_the_checkpoint(reference_run, tmp_path, capsys):
    run = _stopped_copy(reference_run, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["l3d"]["lr"] = 0.05
    config["data"]["options"]["n_samples"] = 64
    config["run"]["checkpoint_seconds"] = 30  # run options may change: not part of the hash
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["decompose", "--resume", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{run / 'config.yaml'} changed since the checkpoint" in err
    assert "data.options.n_samples: 128 -> 64" in err and "l3d.lr: 0.01 -> 0.05" in err, err
    assert "run.checkpoint_seconds" not in err
    assert not (run / "decomposition").exists()
    # Restoring the config (run options changed are fine) resumes.
    config["l3d"]["lr"], config["data"]["options"]["n_samples"] = 0.01, 128
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["decompose", "--resume", str(run), "-q"]) == 0
    assert runs.RunDir(run).finished


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(epoch="60"), "key 'epoch': Input should be a valid integer"),
        (lambda s: s.pop("optimizer_state"), "key 'optimizer_state': Field required"),
        (lambda s: s.update(history=s["history"][:3]), "history has 3 records for epoch 60"),
        (lambda s: s.update(tensors="../../etc/passwd"), "key 'tensors'"),
        (lambda s: s["param_groups"][0].update(lr="fast"), "param_groups"),
        (lambda s: s["optimizer_state"].update(x={}), "optimizer_state"),
        (lambda s: s.pop("tensors") and s.update(version=2), "checkpoint version 2"),
        ("[1, 2]", "must be a JSON object"),
        ('{"version": 1, "epoch": 2', "is not valid JSON"),
    ],
)
def test_a_hand_edited_checkpoint_index_is_a_one_line_error_naming_it(
    reference_run, tmp_path, capsys, edit, message
):
    run = _stopped_copy(reference_run, tmp_path)
    index = run / "checkpoint" / "state.json"
    if isinstance(edit, str):
        index.write_text(edit)
    else:
        state = json.loads(index.read_text())
        edit(state)
        index.write_text(json.dumps(state))
    assert main(["decompose", "--resume", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(index) in err and message in err, err


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.time() + 120
    while _checkpoint_epoch(run_dir) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never checkpointed"
        time.sleep(0.02)


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_pid(tmp_path):
    """Two processes on one run folder: the second gets one line naming the first's pid and
    changes nothing; once the first is killed (its lock dies with it) a resume works."""
    config = _config(tmp_path, epochs=100_000)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        _cli("decompose", str(config), "--out", str(run_dir), "-q"),
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        _wait_for_checkpoint(first, run_dir)
        config_before = (run_dir / "config.yaml").read_bytes()
        seconds = [  # at once: each spends most of its time importing torch
            subprocess.Popen(_cli(*argv, "-q"), stderr=subprocess.PIPE, text=True, env=ENV)
            for argv in (
                ["decompose", "--resume", str(run_dir)],
                ["decompose", str(config), "--out", str(run_dir), "--overwrite"],
                ["decompose", str(config), "--out", str(run_dir)],
            )
        ]
        for second in seconds:
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert err.count("\n") == 1, err
            assert f"is in use by another l3d process (pid {first.pid})" in err
        assert first.poll() is None
        assert (run_dir / "config.yaml").read_bytes() == config_before
        epochs = [r["epoch"] for r in runs.RunDir(run_dir).metrics_records()]
        assert epochs == list(range(len(epochs)))  # one writer: no repeated epochs
    finally:
        first.kill()
        first.communicate(timeout=60)
    # The dead process's lock does not block; its pid may still be in the lock file.
    done = _checkpoint_epoch(run_dir)
    resumed = subprocess.Popen(
        _cli("decompose", "--resume", str(run_dir)), stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 120
    while _checkpoint_epoch(run_dir) <= done:
        assert resumed.poll() is None, resumed.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    resumed.terminate()
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 128 + signal.SIGTERM, err
    assert f"resuming {run_dir} from epoch {done}" in err


def test_the_lock_is_reentrant_and_released(tmp_path):
    run_dir = runs.RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    with run_dir.lock():
        with run_dir.lock():  # execute() inside the CLI's lock
            pass
        assert (run_dir.path / ".lock").read_text().strip() == str(os.getpid())
    with run_dir.lock():
        pass


def test_a_signal_that_lands_in_a_finaliser_still_stops_the_run(tmp_path, monkeypatch):
    """Python drops an exception raised while it runs a finaliser (`__del__`, a weakref callback:
    "Exception ignored in ..."), so a signal handler that only raises would lose a SIGTERM that
    arrives there and the run would go on to its last epoch. It must stop after the step."""
    from l3d.runs import execution

    class SignalsWhenCollected:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # runs the Python handler inside __del__

    save = execution.save_checkpoint
    calls = []

    def save_then_collect(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            SignalsWhenCollected()  # collected at once: the handler runs in its finaliser

    monkeypatch.setattr(execution, "save_checkpoint", save_then_collect)
    run_dir = runs.create_run(runs.load_spec(_config(tmp_path)), tmp_path / "run")
    with pytest.raises(runs.Interrupted) as stop:
        runs.execute(run_dir, progress=False, log=lambda m: None)
    assert stop.value.signum == signal.SIGTERM
    assert stop.value.epoch == 2  # the epoch whose checkpoint was being written
    assert _checkpoint_epoch(run_dir.path) == 2
    assert not (run_dir.path / "decomposition").exists()


def test_a_signal_during_set_up_is_a_stop_not_an_error(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while the run checks the divergence on a sample (set-up, before any
    epoch) stops the run; it is not reported as that check failing."""
    from l3d.core.divergences import mse
    from l3d.runs import execution

    def signalling_mse(output, reference):
        signal.raise_signal(signal.SIGTERM)
        return mse(output, reference)

    monkeypatch.setattr(execution, "resolve_custom", lambda config: (signalling_mse, None))
    run_dir = runs.create_run(runs.load_spec(_config(tmp_path)), tmp_path / "run")
    with pytest.raises(runs.Interrupted) as stop:
        runs.execute(run_dir, progress=False, log=lambda m: None)
    assert stop.value.signum == signal.SIGTERM and stop.value.epoch == 0


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda s: s["optimizer"]["state"][0].pop("step"), "optimizer state 0 lacks step"),
        (lambda s: s["pair"].__setitem__(next(iter(s["pair"])), torch.zeros(5, 1, 7)), "shape"),
        (lambda s: s.__setitem__("generator", s["generator"][:100].clone()), "generator"),
        (lambda s: next(iter(s["pair"].values())).fill_(float("nan")), "not finite"),
        (
            lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(5, 1, 7)),
            "exp_avg",
        ),
        (lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].fill_(-1.0), "exp_avg_sq"),
        # Used silently: maximize ended at loss 28.9 instead of 0.87, betas (0.9, 1.5) in NaN.
        (lambda s: s["optimizer"]["param_groups"][0].update(maximize=True), "maximize is True"),
        (lambda s: s["optimizer"]["param_groups"][0].update(betas=(0.9, 1.5)), "betas"),
        (lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=5), "weight_decay"),
        # Tracebacks: ValueError from torch's load_state_dict, KeyError, Invalid mt19937 state.
        (lambda s: s["optimizer"]["param_groups"][0].update(params=[0, 1]), "params is"),
        (lambda s: s["optimizer"]["param_groups"][0].pop("betas"), "betas is missing"),
        (lambda s: s["generator"].zero_(), "generator state is not one torch can restore"),
        # Resumed silently: bias correction restarted, factors off by 0.18.
        (lambda s: s["optimizer"]["state"][0]["step"].zero_(), "at step 0, the run at 4"),
    ],
)
def test_a_damaged_training_state_is_one_line(damage, said):
    """A checkpoint's tensors were loaded unchecked: tracebacks for a missing slot, another
    shape or a short RNG state; a NaN factor trained on to a NaN decomposition (exit 0); a
    reshaped or negative AdamW moment resumed silently to another result."""
    spec = runs.RunSpec.create(TINY)
    model = runs.build_model(spec.model)
    data = runs.build_data(spec.data, spec.model)
    config = spec.l3d.replace(epochs=2)
    _, _, trainer = build(model, data, config)
    trainer.run_epoch()
    state = trainer.state_dict()
    damage(state)
    _, _, restored = build(model, data, config)
    with pytest.raises(L3DError, match=said) as err:
        restored.load_state_dict(state)
    assert "\n" not in str(err.value)
