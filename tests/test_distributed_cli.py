"""`torchrun --nproc-per-node 2 -m l3d decompose` is one distributed run (CPU, gloo): stopped by
SIGTERM it resumes with 1 or 2 processes to the single-process result, and a rank that dies ends
the job with a non-zero exit, a one-line reason and an intact checkpoint; the same with sharded
factors. Slow: each launch of
torchrun and its workers takes seconds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from l3d import runs
from test_distributed import ATOL, RTOL, free_port

# The same run with its factors sharded over the processes (FSDP2): the run section does not enter
# the checkpoint's config, so its result and resumes are the unsharded run's.
SHARDED = {"checkpoint_seconds": 0, "progress": False, "shard_factors": True}
SLOW_MODEL = """
import time

from l3d.toys import TMS


class SlowTMS(TMS):
    \"\"\"TMS whose forward takes 20 ms longer, so that a test can stop a run of few steps.\"\"\"

    def forward(self, x):
        time.sleep(0.02)
        return super().forward(x)
"""
# Few steps: round-off that differs between 1 and 2 processes grows with the number of steps.
SPEC = {
    "model": {"python": "SLOW:SlowTMS", "options": {"n_features": 5, "n_hidden": 2}},
    "data": {"toy": "tms", "options": {"n_samples": 96, "seed": 1}},
    "l3d": {
        "params": ["W_in", "W_out", "b"],
        "n_subnetworks": 5,
        "epochs": 8,
        "batch_size": 32,
        "lr": 0.01,
        "seed": 3,
        "gradient_method": "vmap",
        "resample_every": 3,
        "resample_until": 7,
    },
    "run": {"checkpoint_seconds": 0, "progress": False},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _l3d(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "l3d", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "-m",
        "l3d",
        *args,
    ]


def _checkpoint_epoch(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of `rank` among the launcher's children."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher.pid and (
            f"RANK={rank}".encode() in environ
        ):
            return int(pid)
    return None


def _start(config: Path, run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        _l3d("decompose", str(config), "--out", str(run_dir), nproc=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.time() + 120
    while _checkpoint_epoch(run_dir) < 2 and proc.poll() is None:
        assert time.time() < deadline, "the run never reached its first checkpoints"
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1]
    return proc


def _resume(run_dir: Path, nproc: int) -> None:
    done = subprocess.run(
        _l3d("decompose", "--resume", str(run_dir), nproc=nproc),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    a = load_file(str(run_dir / "decomposition" / "subnetworks.safetensors"))
    b = load_file(str(reference / "decomposition" / "subnetworks.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=RTOL, msg=key)
    mine, theirs = runs.RunDir(run_dir).metrics_records(), runs.RunDir(reference).metrics_records()
    assert [r["epoch"] for r in mine] == list(range(SPEC["l3d"]["epochs"]))
    for x, y in zip(mine, theirs):
        assert x["step"] == y["step"] and x.get("resampled") == y.get("resampled")
        assert x["loss_paper"] == pytest.approx(y["loss_paper"], abs=ATOL, rel=RTOL)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """The config and its uninterrupted single-process run."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "slow_tms.py").write_text(SLOW_MODEL)
    spec = json.loads(json.dumps(SPEC).replace("SLOW", str(folder / "slow_tms.py")))
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(spec))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs.execute(
            runs.create_run(runs.load_spec(config), folder / "reference"),
            progress=False,
            log=lambda m: None,
        )
    finally:
        torch.set_num_threads(threads)
    return config, folder / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_sigterm_then_resume_with_one_or_two_processes(tmp_path, setup, sharded):
    config, reference = setup
    if sharded:
        spec = yaml.safe_load(config.read_text())
        config = tmp_path / "sharded.yaml"
        config.write_text(yaml.safe_dump({**spec, "run": SHARDED}))
    stopped = tmp_path / "stopped"
    proc = _start(config, stopped)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"l3d decompose --resume {stopped}" in err
    assert err.count("l3d decompose: stopped by") <= 1, err  # rank 0 says it, not every rank
    epoch = _checkpoint_epoch(stopped)
    assert 2 <= epoch < SPEC["l3d"]["epochs"], err
    assert json.loads((stopped / "checkpoint" / "state.json").read_text())["world_size"] == 2
    assert not (stopped / "decomposition").exists()
    assert not (stopped / ".lock").exists()

    again = tmp_path / "again"
    shutil.copytree(stopped, again)
    _resume(stopped, nproc=1)
    _assert_same_run(stopped, reference)
    _resume(again, nproc=2)
    _assert_same_run(again, reference)
    records = runs.RunDir(again).metrics_records()
    assert {r["world_size"] for r in records} == {2}


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_job_and_keeps_the_checkpoint(tmp_path, setup):
    config, reference = setup
    run_dir = tmp_path / "run"
    proc = _start(config, run_dir)
    victim = _rank_pid(proc, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # Rank 0 either notices the lost rank at its next collective or, on a loaded machine, is
    # first sent SIGTERM by torchrun's agent (which saw rank 1 die): a stop either way, with the
    # checkpoint kept and the resume command printed.
    assert "lost contact with the other ranks" in err or "exitcode  : 143" in err, err
    assert f"l3d decompose --resume {run_dir}" in err
    assert not (run_dir / "decomposition").exists()
    state = runs.load_checkpoint(run_dir / "checkpoint")
    assert state is not None and state["epoch"] >= 2
    _resume(run_dir, nproc=1)
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_stuck_rank_stops_the_job_after_the_rank_timeout(tmp_path, setup, monkeypatch):
    """A rank that hangs without dying (SIGSTOP, a deadlocked loader) kept the others waiting
    in their collective for torch's 30-minute default; L3D_RANK_TIMEOUT sets the wait."""
    config, _ = setup
    monkeypatch.setitem(ENV, "L3D_RANK_TIMEOUT", "5")
    run_dir = tmp_path / "run"
    proc = _start(config, run_dir)
    victim = _rank_pid(proc, 1)
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    try:
        start = time.time()
        _, err = proc.communicate(timeout=90)
        assert time.time() - start < 60, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    assert proc.returncode != 0
    assert "lost contact with the other ranks" in err, err
    assert f"l3d decompose --resume {run_dir}" in err
    assert runs.load_checkpoint(run_dir / "checkpoint")["epoch"] >= 2


def test_a_bad_rank_timeout_is_one_line(monkeypatch):
    from l3d import L3DError
    from l3d.runs.execution import rank_timeout

    monkeypatch.setenv("L3D_RANK_TIMEOUT", "soon")
    with pytest.raises(L3DError, match="L3D_RANK_TIMEOUT='soon'.*seconds"):
        rank_timeout()
    monkeypatch.setenv("L3D_RANK_TIMEOUT", "90")
    assert rank_timeout().total_seconds() == 90
    monkeypatch.delenv("L3D_RANK_TIMEOUT")
    assert rank_timeout() is None


@pytest.mark.slow
def test_analyze_on_two_processes_equals_one(tmp_path, setup):
    """`torchrun -m l3d analyze`: the ranks split the impact pass, rank 0 writes the same
    analysis as one process (impacts within round-off, the same top samples)."""
    _, reference = setup
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"analysis-{nproc}"
        done = subprocess.run(
            _l3d("analyze", str(reference), "--out", str(out), "--n-references", "3", nproc=nproc),
            capture_output=True,
            text=True,
            timeout=300,
            env=ENV,
        )
        assert done.returncode == 0, done.stderr
        outputs[nproc] = out
    one, two = (load_file(str(outputs[n] / "impact.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=ATOL, rtol=RTOL, msg=key)
    records = [json.loads((outputs[n] / "analysis.json").read_text()) for n in (1, 2)]
    tops = [[[e["sample"] for e in r["top_samples"]] for r in a["subnetworks"]] for a in records]
    assert tops[0] == tops[1]


def test_other_commands_refuse_torchrun(tmp_path, monkeypatch, capsys):
    """Only `decompose` and `analyze` are distributed: under torchrun `report` (and the others)
    would each do all the work."""
    from l3d.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "l3d report: error: `l3d report` runs in one process: launch it without torchrun "
        "(only `l3d decompose` and `l3d analyze` are distributed; see docs/distributed.md)\n"
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "abc"}, r"WORLD_SIZE is 'abc', not a number of processes"),
        (
            {"WORLD_SIZE": "2"},
            r"WORLD_SIZE=2 is set but not RANK, MASTER_ADDR, MASTER_PORT: launch the processes "
            r"with torchrun \(torchrun --nproc-per-node 2 -m l3d decompose",
        ),
        ({"WORLD_SIZE": "2", "RANK": "0"}, r"but not MASTER_ADDR, MASTER_PORT"),
    ],
)
def test_a_process_group_set_up_by_hand_gets_a_clear_error(
    tmp_path, monkeypatch, capsys, env, message
):
    """WORLD_SIZE set without torchrun's other variables died in torch's rendezvous."""
    from l3d.cli import main

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"toy": "tms"}, "data": {"toy": "tms"},
                                      "l3d": {"n_subnetworks": 5, "epochs": 1}}))  # fmt: skip
    assert main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()
    if env["WORLD_SIZE"] == "abc":
        assert main(["report", str(tmp_path)]) == 2
        assert re.search(message, capsys.readouterr().err)
