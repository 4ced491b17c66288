"""`l3d` from config file to report on a toy model; bad configs give one-line errors, exit
code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import l3d
from l3d import runs
from l3d.cli import main
from l3d.toys import TMS

TINY = {
    "model": {"python": "l3d.toys:TMS", "options": {"n_features": 5, "n_hidden": 2}},
    "data": {"toy": "tms", "options": {"n_samples": 200, "seed": 1}},
    "l3d": {
        "params": ["W_in", "W_out", "b"],
        "n_subnetworks": 5,
        "epochs": 4,
        "batch_size": 50,
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine their spin-waits cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    config = _write(folder / "tiny.yaml", TINY)
    code = main(["decompose", str(config), "--out", str(folder / "run"), "--set", "epochs=3", "-q"])
    assert code == 0
    return folder / "run"


def test_decompose_writes_a_complete_run_folder(finished_run):
    run_dir = runs.RunDir(finished_run)
    spec = run_dir.spec()
    assert spec.l3d.epochs == 3  # the --set override is in the resolved config
    assert spec == runs.RunSpec.create(yaml.safe_load(run_dir.config.read_text()))
    lines = run_dir.metrics_records()
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    for key in ("step", "loss_paper", "loss_pooled_squared", "lr", "live_subnetworks", "time"):
        assert all(key in r for r in lines), key
    assert json.loads((finished_run / "checkpoint" / "state.json").read_text())["epoch"] == 3
    # A python model source is rebuilt by calling it again: the same weights as decomposed.
    model = TMS(5, 2)
    decomposition = l3d.load(run_dir.decomposition, model)
    torch.testing.assert_close(
        decomposition.target.w0["W_in"], runs.open_run(finished_run).model.W_in
    )
    assert decomposition.n_subnetworks == 5
    assert decomposition.history == [{k: r[k] for k in decomposition.history[0]} for r in lines]


def test_intervene_measures_output_change_like_a_perturbed_copy(finished_run):
    """Oracle: copy the model, add delta * v_k to its weights by hand, compare outputs with MSE."""
    assert (
        main(["intervene", str(finished_run), "--subnetwork", "1", "--delta", "0.5", "2", "-q"])
        == 0
    )
    result = json.loads((finished_run / "interventions" / "subnetwork_1.json").read_text())
    assert (finished_run / "interventions" / "subnetwork_1.png").stat().st_size > 0
    run = runs.open_run(finished_run)
    x = run.data[:200]
    direction = run.decomposition.v_out(1)
    for delta, change in zip([0.5, 2.0], result["change"]):
        moved = TMS(5, 2)
        moved.load_state_dict(run.model.state_dict())
        with torch.no_grad():
            for name, param in moved.named_parameters():
                param += delta * direction[name]
            expected = (moved(x) - run.model(x)).pow(2).mean(1)
        torch.testing.assert_close(torch.tensor(change), expected, rtol=1e-4, atol=1e-7)
    impact = run.decomposition.impact(x, n_references=10)[:, 1]
    torch.testing.assert_close(torch.tensor(result["impact"]), impact, rtol=1e-5, atol=1e-8)


def test_report_command_writes_a_page(finished_run, capsys):
    assert main(["report", str(finished_run)]) == 0
    page = finished_run / "report" / "index.html"
    assert str(page) in capsys.readouterr().err
    assert page.read_text().count('class="subnetwork') == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"l3d": {**TINY["l3d"], "n_subnetwork": 5}},
            "unknown config key 'l3d.n_subnetwork' (did you mean n_subnetworks",
        ),
        ({"l3d": {**TINY["l3d"], "epochs": "ten"}}, "config key 'l3d.epochs'"),
        ({"l3d": {**TINY["l3d"], "top_k": 2.0}}, "config key 'l3d.top_k': must be in (0, 1]"),
        ({"modle": TINY["model"]}, "unknown config key 'modle' (did you mean model"),
        (
            {"model": {"toy": "tms", "python": "x:y"}},
            "'model' needs exactly one of toy, hf, python",
        ),
        ({"model": {"toy": "tmz"}}, "unknown experiment 'tmz' (did you mean tms"),
        ({"model": {"python": "no_such_module_xyz:make"}}, "cannot import no_such_module_xyz"),
        ({"model": {"python": "l3d.toys:TMZ"}}, "has no 'TMZ'; did you mean TMS"),
        ({"model": {"toy": "tms", "options": {"n_hidden": 3}}}, "unknown options ['n_hidden']"),
        ({"model": {**TINY["model"], "options": {"n_feature": 3}}}, "bad options"),
        ({"data": {"toy": "tms", "options": {"n": 3}}}, "valid: n_samples, seed"),
        (
            {"data": {"file": "missing.safetensors"}},
            "data file 'missing.safetensors' does not exist",
        ),
        (
            {"l3d": {**TINY["l3d"], "params": ["W_inn"]}},
            "params pattern 'W_inn' matches no parameter",
        ),
        ({"run": {"tracking": "mlflow"}}, "config key 'run.tracking'"),
    ],
)
def test_bad_config_gives_one_line_error_and_exit_code_2(tmp_path, capsys, change, message):
    config = _write(tmp_path / "bad.yaml", {**TINY, **change})
    code = main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("l3d decompose: error: "), err
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["decompose", "{tmp}/missing.yaml"], "config file '{tmp}/missing.yaml' does not exist"),
        (["decompose", "{tmp}/broken.yaml"], "broken.yaml is not valid YAML at line "),
        (["decompose", "{tmp}/list.yaml"], "must be a YAML mapping"),
        (["decompose", "{tmp}/ok.yaml", "--set", "epochs"], "--set takes key=value"),
        (["decompose", "{tmp}/ok.yaml", "--set", "l3d.lr=-1"], "config key 'l3d.lr'"),
        (["decompose"], "give a run config"),
        (["decompose", "--resume", "{tmp}"], "is not a run folder"),
        (["report", "{tmp}/nowhere"], "run folder '{tmp}/nowhere' does not exist"),
        (["intervene", "{tmp}", "--subnetwork", "0", "--delta", "1"], "is not a run folder"),
    ],
)
def test_bad_command_line_gives_one_line_error(tmp_path, capsys, argv, message):
    (tmp_path / "broken.yaml").write_text("model:\n  toy: [tms\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    _write(tmp_path / "ok.yaml", TINY)
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err


def test_existing_run_folder_is_not_overwritten(finished_run, capsys):
    config = _write(finished_run.parent / "again.yaml", TINY)
    assert main(["decompose", str(config), "--out", str(finished_run), "-q"]) == 2
    assert f"l3d decompose --resume {finished_run}" in capsys.readouterr().err


def test_a_run_that_failed_before_any_work_can_be_started_again(tmp_path, capsys):
    """A config error found at run time (bad data options) leaves no work to protect: after the
    fix, the same command starts over instead of demanding --resume (which replays the bad config)
    or --overwrite."""
    bad = {**TINY, "data": {"toy": "tms", "options": {"n_sample": 200}}}
    out = str(tmp_path / "run")
    assert main(["decompose", str(_write(tmp_path / "c.yaml", bad)), "--out", out, "-q"]) == 2
    assert "unknown options ['n_sample']" in capsys.readouterr().err
    fixed = {**TINY, "l3d": {**TINY["l3d"], "epochs": 1}}
    assert main(["decompose", str(_write(tmp_path / "c.yaml", fixed)), "--out", out, "-q"]) == 0
    assert runs.RunDir(Path(out)).finished


def test_intervene_rejects_a_subnetwork_out_of_range(finished_run, capsys):
    assert main(["intervene", str(finished_run), "--subnetwork", "7", "--delta", "1"]) == 2
    assert "this run has subnetworks 0..4" in capsys.readouterr().err


def test_set_overrides_parse_values_as_yaml():
    data = runs.apply_overrides(
        TINY, ["epochs=7", "l3d.params=[W_in]", "rank={W_in: 2}", "run.progress=false"]
    )
    spec = runs.RunSpec.create(data)
    assert spec.l3d.epochs == 7 and spec.l3d.params == ("W_in",) and spec.l3d.rank == {"W_in": 2}
    assert spec.run.progress is False
    assert TINY["l3d"]["epochs"] == 4  # the input is not modified


def test_python_sources_and_relative_paths(tmp_path, monkeypatch):
    """'file.py:function' model and data sources, resolved relative to the config file."""
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "def model(width):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(\n"
        "        torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 2)\n"
        "    )\n"
        "def data(n):\n"
        "    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0))\n"
    )
    spec = {
        "model": {"python": "mine.py:model", "options": {"width": 4}},
        "data": {"python": "mine.py:data", "options": {"n": 40}},
        "l3d": {
            "params": ["0.weight", "2.weight"],
            "n_subnetworks": 3,
            "epochs": 2,
            "batch_size": 20,
        },
    }
    config = _write(tmp_path / "py.yaml", spec)
    monkeypatch.chdir(
        "/"
    )  # relative paths are relative to the config file, not the working directory
    assert main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"]) == 0
    run = runs.open_run(tmp_path / "run")
    assert run.spec.model.python == f"{tmp_path / 'mine.py'}:model"
    assert run.decomposition.names == ["0.weight", "2.weight"]


def test_every_command_has_help_with_examples(capsys):
    for command in ("decompose", "experiment", "analyze", "intervene", "report"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out, command


def test_installed_script_prints_no_traceback_for_a_user_error(tmp_path):
    script = Path(sys.executable).parent / "l3d"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "l3d.cli"]
    config = _write(tmp_path / "bad.yaml", {**TINY, "l3d": {**TINY["l3d"], "lr": "fast"}})
    result = subprocess.run(
        [*command, "decompose", str(config)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "l3d decompose: error: config key 'l3d.lr': Input should be a valid number, unable to "
        "parse string as a number (got 'fast')"
    ]


@pytest.mark.slow
def test_toy_model_source_is_trained_once_and_kept_in_the_run(tmp_path, monkeypatch):
    """`model: {toy: tms}` trains the paper's toy through the toy registry; the run folder
    keeps its weights, so reopening the run rebuilds the same model without training."""
    monkeypatch.setenv("L3D_CACHE", str(tmp_path / "cache"))
    spec = {**TINY, "model": {"toy": "tms", "options": {"seed": 0}}}
    config = _write(tmp_path / "toy.yaml", spec)
    assert main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"]) == 0
    trained = runs.open_run(tmp_path / "run").model.state_dict()
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr("l3d.toys.registry.train_toy_model", None)  # must not be called
    reopened = runs.open_run(tmp_path / "run").model.state_dict()
    assert json.loads((tmp_path / "run" / "model.json").read_text())["toy"] == "tms"
    for name, value in trained.items():
        torch.testing.assert_close(reopened[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("example", sorted(Path(__file__).parents[1].glob("examples/*.yaml")))
def test_example_configs_are_valid_run_specs(example):
    spec = runs.RunSpec.create(yaml.safe_load(example.read_text()))
    assert spec.l3d.n_subnetworks >= 1


def test_experiment_lists_the_toy_suite_and_rejects_unknown_names(capsys):
    assert main(["experiment", "tms", "--set", "top_k", "-q"]) == 2
    assert "--set takes key=value" in capsys.readouterr().err
    assert main(["experiment", "suite", "--set", "top_k=0.2", "-q"]) == 2
    assert "not the suite" in capsys.readouterr().err
    assert main(["experiment", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["tms", "tms40", "tmcs", "higher_rank", "squares", "squares_wide", "resid_mlp"]
    assert main(["experiment", "tmz", "-q"]) == 2
    assert "unknown experiment 'tmz' (did you mean tms?)" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_delegates_to_the_suite_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("L3D_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tms"
    assert main(["experiment", "tms", "--quick", "--seeds", "0", "--out", str(out), "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["seeds"]) == 1
    assert (out / "summary.md").is_file()


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_tracking_that_is_not_installed_is_a_clear_error_before_any_work(
    tmp_path, capsys, tracker, monkeypatch
):
    module = "wandb" if tracker == "wandb" else "torch.utils.tensorboard"
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    spec = {**TINY, "run": {"tracking": tracker}}
    config = _write(tmp_path / "track.yaml", spec)
    assert main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"]) == 2
    assert f"pip install {tracker}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_overwrite_clears_the_old_runs_outputs_and_a_cut_metric_line_is_skipped(
    finished_run, tmp_path
):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    with (copy / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "st')  # killed mid-write
    assert [r["epoch"] for r in runs.RunDir(copy).metrics_records()] == [0, 1, 2]
    (copy / "analysis").mkdir(exist_ok=True)
    config = _write(tmp_path / "again.yaml", TINY)
    spec = runs.load_spec(config)
    run_dir = runs.create_run(spec, copy, overwrite=True)
    assert sorted(p.name for p in copy.iterdir()) == ["config.yaml"]
    assert run_dir.spec() == spec


def test_wandb_tracking_logs_every_epoch_when_asked_for(tmp_path, monkeypatch):
    """With a stand-in wandb module: init with the run spec, one log per epoch, finish."""
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda values, step: calls.append(("log", step, values)),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = _write(tmp_path / "track.yaml", {**TINY, "run": {"tracking": "wandb"}})
    assert main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert calls[0][0] == "init" and calls[0][1]["config"]["l3d"]["n_subnetworks"] == 5
    logs = [c for c in calls if c[0] == "log"]
    metrics = runs.RunDir(tmp_path / "run").metrics_records()
    assert [c[1] for c in logs] == [r["step"] for r in metrics]
    assert [c[2]["loss_paper"] for c in logs] == [r["loss_paper"] for r in metrics]
    assert calls[-1] == ("finish",)


def test_step_callback_sees_every_training_step():
    """The per-step progress bar is fed by run(step_callback=...): once per step."""
    spec = runs.RunSpec.create(TINY)
    model = runs.build_model(spec.model)
    seen = []
    decomposition = l3d.run(
        model,
        runs.build_data(spec.data, spec.model),
        spec.l3d,
        progress=False,
        step_callback=lambda result: seen.append(result.n_samples),
    )
    assert len(seen) == decomposition.history[-1]["step"] == 4 * 4  # 200 samples / 50, 4 epochs
    assert sum(seen) == 4 * 200


def test_a_truncated_factor_file_is_a_one_line_error_naming_it(finished_run, tmp_path, capsys):
    """A crash or a partial copy can truncate a saved file: report and load must name it."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    factors = copy / "decomposition" / "subnetworks.safetensors"
    factors.write_bytes(factors.read_bytes()[:100])
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{factors} is not a readable safetensors file" in err
    with pytest.raises(l3d.L3DError, match="truncated or corrupted"):
        l3d.load(copy / "decomposition", TMS(5, 2))


def test_a_data_file_that_is_not_safetensors_is_named(tmp_path, capsys):
    data = tmp_path / "data.safetensors"
    data.write_text("x,y\n1,2\n")  # e.g. a CSV saved under the wrong name
    config = _write(tmp_path / "c.yaml", {**TINY, "data": {"file": str(data)}})
    assert main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"]) == 2
    assert f"data file {data} is not a readable safetensors file" in capsys.readouterr().err
