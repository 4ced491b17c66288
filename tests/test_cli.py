"""`l3d` from config file to report on a toy model; bad configs give one-line errors, exit
code 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import l3d
from conftest import stopped_after_epoch
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


pytestmark = pytest.mark.usefixtures("one_thread")


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
        ({"model": {"toy": "tmss"}}, "unknown toy 'tmss' (did you mean tms"),
        ({"data": {"toy": "tmss"}}, "unknown toy 'tmss' (did you mean tms"),
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
    assert "--subnetwork 7 out of range: use ints in 0..4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--subnetwork", "0", "0", "--delta", "1"], "--subnetwork 0 is given twice"),
        (["--subnetwork", "0", "--delta", "1", "1"], "--delta 1 is given twice"),
        (["--subnetwork", "0", "--delta", "1e30"], "δ = 1e+30 along subnetwork 0"),
    ],
)
def test_intervene_refuses_repeats_and_steps_that_overflow(finished_run, capsys, argv, message):
    """A repeated subnetwork or step was measured and printed twice; a step so large that the
    outputs overflow printed `inf` changes and a `nan×` ratio."""
    capsys.readouterr()
    assert main(["intervene", str(finished_run), *argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


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
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("l3d decompose: error: config key 'l3d.lr': Input should be a ")
    assert "(got 'fast')" in lines[0]


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


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"l3d {command}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "{run}", "--n-samples", "0"],
        ["analyze", "{run}", "--n-samples", "-5"],
        ["analyze", "{run}", "--n-top", "0"],
        ["analyze", "{run}", "--n-references", "0"],
        ["analyze", "{run}", "--n-samples", "ten"],
        ["intervene", "{run}", "--subnetwork", "0", "--delta", "1", "--n-samples", "0"],
        ["intervene", "{run}", "--subnetwork", "0", "--delta", "1", "--n-samples", "-5"],
        ["intervene", "{run}", "--subnetwork", "0", "--delta", "1", "--n-references", "0"],
    ],
)
def test_sample_counts_must_be_positive_integers(finished_run, capsys, argv):
    """--n-samples 0 was a torch.cat error and -5 silently analysed all but 5 samples."""
    option, value = argv[-2:]
    assert main([a.format(run=finished_run) for a in argv]) == 2
    err = _one_line_error(capsys, argv[0])
    assert f"argument {option}: must be a positive integer, got '{value}'" in err


def test_a_usage_error_is_one_line_too(capsys):
    assert main(["intervene", "somewhere", "--delta", "1"]) == 2
    err = _one_line_error(capsys, "intervene")
    assert "--subnetwork" in err and "l3d intervene --help" in err


@pytest.mark.parametrize("command", ["decompose", "analyze", "report", "intervene", "experiment"])
def test_an_unwritable_output_folder_is_a_one_line_error_naming_it(
    finished_run, tmp_path, capsys, command
):
    """Output under a regular file cannot be created, for root too (chmod does not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "out"
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    argv = {
        "decompose": ["decompose", str(_write(tmp_path / "c.yaml", TINY)), "--out", str(target)],
        "analyze": ["analyze", str(run), "--out", str(target)],
        "report": ["report", str(run), "--out", str(target)],
        "intervene": ["intervene", str(run), "--subnetwork", "0", "--delta", "1"],
        "experiment": ["experiment", "tms", "--quick", "--out", str(target)],
    }[command]
    if command == "intervene":  # the run folder's interventions/ cannot be made
        shutil.rmtree(run / "interventions", ignore_errors=True)
        (run / "interventions").write_text("in the way")
        target = run / "interventions"
    assert main([*argv, "-q"]) == 2
    err = _one_line_error(capsys, command)
    assert f"cannot write to '{target}'" in err


def test_a_read_only_run_folder_is_a_one_line_error(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "interventions", ignore_errors=True)
    run.chmod(0o555)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("running as root: chmod does not make a folder read-only")
        assert main(["intervene", str(run), "--subnetwork", "0", "--delta", "1", "-q"]) == 2
        assert f"cannot write to '{run / 'interventions'}'" in _one_line_error(capsys, "intervene")
        assert main(["decompose", "--resume", str(run), "-q"]) == 0  # finished: nothing to write
    finally:
        run.chmod(0o755)


def test_analyze_writes_to_out_and_prints_headline_numbers(finished_run, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main(["analyze", str(finished_run), "--out", str(out), "--n-top", "3"]) == 0
    assert (out / "analysis.json").is_file()
    err = capsys.readouterr().err
    assert "200 samples" in err and "dead subnetworks 0/5" in err, err
    assert "median intervention selectivity" in err, err
    assert str(out) in err


def test_intervene_prints_the_change_on_top_impact_samples_against_all(finished_run, capsys):
    argv = ["intervene", str(finished_run), "--subnetwork", "1", "--delta", "0.5", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    result = json.loads((finished_run / "interventions" / "subnetwork_1.json").read_text())
    change, impact = torch.tensor(result["change"]), torch.tensor(result["impact"])
    top = impact.argsort(descending=True, stable=True)[:10]
    for delta, row in zip(["0.5", "2"], change):
        line = next(line for line in err.splitlines() if f"δ = {delta}:" in line)
        assert f"{row[top].mean():.3g} on its 10 top-impact samples" in line, line
        assert f"{row.mean():.3g} on all 200" in line, line


def test_report_or_analyze_of_an_experiment_folder_says_what_it_is(tmp_path, capsys):
    folder = tmp_path / "exp-tms"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    (folder / "summary.md").write_text("# tms\n")
    for command in ("report", "analyze"):
        assert main([command, str(folder)]) == 2
        err = _one_line_error(capsys, command)
        assert "is an `l3d experiment` output folder" in err, err
        assert "--resume" not in err
        assert f"{folder / 'summary.md'}" in err


def test_a_python_tag_in_a_saved_config_is_a_one_line_error_naming_it(
    finished_run, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = run / "decomposition" / "config.yaml"
    with config.open("a") as f:
        f.write('hack: !!python/object/apply:os.system ["echo PWNED"]\n')
    for command in ("report", "analyze"):
        assert main([command, str(run), "-q"]) == 2
        err = _one_line_error(capsys, command)
        assert str(config) in err and "python/object" in err, err


def test_the_step_bar_names_the_epoch_and_the_loss_form():
    from l3d.runs.execution import _StepBar

    spec = runs.RunSpec.create(TINY)
    data = runs.build_data(spec.data, spec.model)
    for loss, label in (("paper", "loss (eq. 8)"), ("pooled_squared", "pooled loss")):
        config = spec.l3d.replace(loss=loss)
        seen: list[str] = []
        with _StepBar(config, data, True, first_epoch=2) as bar:
            assert bar.bar is None  # none during the set-up: its clock starts at the first step
            losses = types.SimpleNamespace(
                paper=torch.tensor(0.5), pooled_squared=torch.tensor(0.2)
            )
            bar.step(types.SimpleNamespace(losses=losses))
            assert bar.bar.desc == f"steps of epoch 3/{config.epochs}"
            seen.append(str(bar.bar.postfix))
            bar.wrap(lambda trainer, record: None)(types.SimpleNamespace(epoch=3), {})
            assert bar.bar.desc == f"steps of epoch 4/{config.epochs}"
            bar.wrap(lambda trainer, record: None)(types.SimpleNamespace(epoch=4), {})
            assert bar.bar.desc == "steps of epoch 4/4"  # the last: no "epoch 5/4"
        assert label in seen[0], seen


def test_quiet_silences_the_transformers_loading_bar(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from l3d import hf

    config = hf.tinystories_8m_config(
        vocab_size=12, hidden_size=8, num_layers=1, num_heads=2,
        attention_types=[[["global"], 1]], max_position_embeddings=16,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    hf.random_causal_lm(config, tmp_path / "lm", seed=0)
    ids = torch.randint(2, 12, (6, 5), generator=torch.Generator().manual_seed(0))
    l3d.io.save_tensors(tmp_path / "ids.safetensors", {"ids": ids})
    spec = {
        "model": {"hf": str(tmp_path / "lm")},
        "data": {"file": str(tmp_path / "ids.safetensors")},
        "l3d": {
            "params": ["transformer.h.0.attn.attention.q_proj.weight"],
            "n_subnetworks": 2, "rank": 1, "divergence": "kl", "per_token": True,
            "epochs": 1, "batch_size": 3, "warm_start_epochs": 0,
        },
    }  # fmt: skip
    config_file = _write(tmp_path / "lm.yaml", spec)
    capsys.readouterr()
    assert main(["decompose", str(config_file), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert main(["analyze", str(tmp_path / "run"), "--n-top", "2", "-q"]) == 0
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert captured.err == ""
    assert hf_logging.is_progress_bar_enabled()  # restored after the command


def test_docs_open_run_example_runs_as_written(tmp_path, monkeypatch):
    """docs/cli.md's `open_run` example, on the run folder its comment names."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    section = text.split("## Reopening a run in Python", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path / "t.yaml", {**TINY, "run": {"progress": False}})
    assert main(["decompose", str(config), "--out", "runs/tms", "-q"]) == 0
    namespace: dict = {}
    exec(compile(block, "docs/cli.md", "exec"), namespace)
    assert namespace["coefficients"].shape[1] == 5


def test_a_file_system_error_midway_is_one_line_naming_the_file(finished_run, monkeypatch, capsys):
    """A folder made read-only (or a full disk) after the up-front checks: still no traceback."""
    import errno

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/x/checkpoint/state.json")

    monkeypatch.setattr(runs, "execute", denied)
    config = _write(finished_run.parent / "fs.yaml", TINY)
    out = finished_run.parent / "fs-run"
    assert main(["decompose", str(config), "--out", str(out), "-q"]) == 2
    err = _one_line_error(capsys, "decompose")
    assert "cannot access '/runs/x/checkpoint/state.json' (Permission denied)" in err
    monkeypatch.setattr(runs, "execute", lambda *a, **k: (_ for _ in ()).throw(OSError("other")))
    with pytest.raises(OSError, match="other"):  # not a file error of the user's: not hidden
        main(["decompose", str(config), "--out", str(out), "--overwrite", "-q"])


def test_intervention_headline_gives_no_ratio_within_round_off():
    from l3d.cli import _intervention_headline

    impact = torch.tensor([3.0, 2.0, 1.0, 0.0])
    change = torch.tensor([[4e-12, 1e-12, 0.0, 0.0], [4.0, 1.0, 0.0, 0.0]])
    lines = _intervention_headline(impact, change, [0.1, 1.0], floor=1e-9)
    assert lines[0].endswith("(below noise)") and "×" not in lines[0]
    assert "below noise" not in lines[1] and lines[1].endswith("×)")


def test_decompose_prints_the_training_state_estimate_first(tmp_path, capsys):
    config = _write(tmp_path / "tiny.yaml", TINY)
    argv = ["decompose", str(config), "--out", str(tmp_path / "run"), "--set", "epochs=1"]
    assert main([*argv, "--set", "run.progress=false"]) == 0
    err = capsys.readouterr().err
    # V_in and V_out of 5 rank-1 subnetworks: 5 (2 + 5) entries each for W_in (2, 5) and W_out
    # (5, 2), 5 * 5 for b (5,); times 2 factor sets, 4 bytes, and 4 copies (values, gradients,
    # AdamW's two moments): 3040 bytes.
    assert "training state (V_in, V_out, their gradients, AdamW moments): about 3.0 kB" in err
    assert "; one step adds about " in err  # tests/test_algorithm.py checks its parts
    assert err.index("training state") < err.index("saved to")  # before training


def test_n_subnetworks_auto_is_chosen_from_the_data_and_kept_on_resume(
    tmp_path, monkeypatch, capsys
):
    """`n_subnetworks` left out of a config file (its default, `auto`): the run takes
    choose_n_subnetworks's count and ends bit-identical to a run given that count; stopped and
    resumed, it takes the count from the checkpoint (the choice is not made again)."""
    import signal

    from safetensors.torch import load_file

    from l3d import decomposition

    auto = {**TINY, "l3d": {k: v for k, v in TINY["l3d"].items() if k != "n_subnetworks"}}
    out = tmp_path / "auto"
    argv = ["decompose", str(_write(tmp_path / "auto.yaml", auto)), "--out", str(out), "-q"]
    with stopped_after_epoch(2):
        assert main(argv) == 128 + signal.SIGTERM

    def no_second_choice(*args, **kwargs):
        raise AssertionError("a resumed run must take the checkpoint's count")

    monkeypatch.setattr(decomposition, "choose_n_subnetworks", no_second_choice)
    assert main(["decompose", "--resume", str(out), "-q"]) == 0
    monkeypatch.undo()
    loaded = runs.open_run(out)
    chosen = loaded.decomposition.n_subnetworks
    config = l3d.L3DConfig.create(**{**TINY["l3d"], "n_subnetworks": 1})
    assert chosen == decomposition.choose_n_subnetworks(loaded.model, loaded.data, config) != 5
    fixed = {**TINY, "l3d": {**TINY["l3d"], "n_subnetworks": chosen}}
    out_fixed = tmp_path / "fixed"
    argv = ["decompose", str(_write(tmp_path / "f.yaml", fixed)), "--out", str(out_fixed), "-q"]
    assert main(argv) == 0
    a = load_file(str(out / "decomposition" / "subnetworks.safetensors"))
    b = load_file(str(out_fixed / "decomposition" / "subnetworks.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_check_validates_and_estimates_without_a_run(tmp_path, monkeypatch, capsys):
    """--check builds model and data, chooses n_subnetworks: auto, prints the memory estimate and
    stops: no run folder; a run that would not fit is refused there in one line."""
    from l3d.core import algorithm

    monkeypatch.chdir(tmp_path)
    auto = {**TINY, "l3d": {**TINY["l3d"], "n_subnetworks": "auto"}}
    config = _write(tmp_path / "auto.yaml", auto)
    assert main(["decompose", str(config), "--check"]) == 0
    err = capsys.readouterr().err
    assert "; one step adds about " in err
    assert "auto.yaml: ready to run (" in err and "(auto subnetworks)" not in err
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(algorithm, "device_memory", lambda device: 1000)
    assert main(["decompose", str(config), "--check"]) == 2
    assert "one training step needs about" in _one_line_error(capsys, "decompose")
    assert main(["decompose", "--resume", str(tmp_path), "--check"]) == 2
    assert "drop CONFIG/--set/--out/--check" in _one_line_error(capsys, "decompose")


def test_a_toy_run_whose_config_names_another_toy_is_one_line(tmp_path):
    """A run folder keeps its trained toy (model.safetensors, model.json); a config.yaml edited
    to another toy, or weights of another shape, failed in load_state_dict's size mismatch."""
    from l3d.io import save_tensors, write_json
    from l3d.runs import sources
    from l3d.toys import registry as toys

    run_dir = runs.RunDir(tmp_path)
    save_tensors(run_dir.model_weights, toys.get_toy("tms").make(0)[0].state_dict())
    write_json(run_dir.model_info, {"toy": "tms", "init_seed": 0})
    assert isinstance(sources._toy_model("tms", {}, run_dir), torch.nn.Module)
    with pytest.raises(l3d.L3DError, match=r"trained 'tms' toy.*names toy 'tms40'"):
        sources._toy_model("tms40", {}, run_dir)
    save_tensors(run_dir.model_weights, toys.get_toy("tms40").make(0)[0].state_dict())
    with pytest.raises(l3d.L3DError, match=r"model.safetensors does not fit toy 'tms'"):
        sources._toy_model("tms", {}, run_dir)


def test_a_data_file_changed_since_the_run_is_refused_by_resume_and_analysis(tmp_path, capsys):
    """The run records the sha256 of its data file: a file replaced since (other inputs, other
    counterparts) would give a resumed run, an analysis or an intervention of data the
    decomposition never saw, silently. Unchanged, everything works."""
    from safetensors.torch import save_file

    from l3d.toys import sparse_features

    data = tmp_path / "data.safetensors"
    save_file(
        {"x": sparse_features(120, 5, 0.3, generator=torch.Generator().manual_seed(0))}, str(data)
    )
    spec = {**TINY, "data": {"file": str(data), "options": {"key": "x"}}}
    spec["run"] = {"checkpoint_seconds": 0}
    config = _write(tmp_path / "file.yaml", spec)
    run = tmp_path / "run"
    with stopped_after_epoch(2):
        assert main(["decompose", str(config), "--out", str(run), "-q"]) == 128 + 15
    recorded = json.loads((run / "data.json").read_text())
    assert list(recorded) == [str(data)] and len(recorded[str(data)]) == 64
    save_file(
        {"x": sparse_features(120, 5, 0.3, generator=torch.Generator().manual_seed(1))}, str(data)
    )
    capsys.readouterr()
    assert main(["decompose", "--resume", str(run), "-q"]) == 2
    err = _one_line_error(capsys, "decompose")
    assert f"{data} has changed since this run started" in err and "restore it" in err, err
    save_file(
        {"x": sparse_features(120, 5, 0.3, generator=torch.Generator().manual_seed(0))}, str(data)
    )
    assert main(["decompose", "--resume", str(run), "-q"]) == 0
    assert main(["analyze", str(run), "-q"]) == 0
    save_file(
        {"x": sparse_features(120, 5, 0.3, generator=torch.Generator().manual_seed(2))}, str(data)
    )
    capsys.readouterr()
    for command in (["analyze", str(run)], ["intervene", str(run), "--subnetwork", "0",
                                            "--delta", "1"]):  # fmt: skip
        assert main([*command, "-q"]) == 2
        err = _one_line_error(capsys, command[0])
        assert f"{data} has changed since this run started" in err, err
    # The report of the finished run keeps its numbers but shows no examples of other inputs.
    assert main(["report", str(run), "-q"]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "has changed since this run started" in page and "shown by sample number" in page


def test_options_are_checked_against_the_signature_not_the_error_text(tmp_path, monkeypatch):
    """`module:function` sources: options the function does not take are one line; a TypeError
    raised inside the function (its own bug, whose message may mention "arguments") is its own,
    not reported as bad options."""
    from l3d.runs import sources

    (tmp_path / "userdata.py").write_text(
        "import torch\n"
        "def good(n=4):\n    return torch.ones(n, 5)\n"
        "def buggy(n=4):\n    return torch.zeros(n, 5, colour=1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    good = sources.import_object("userdata:good", "data")
    assert sources._call(good, {"n": 2}, "data").shape == (2, 5)
    with pytest.raises(l3d.L3DError, match=r"data: bad options \{'m': 2\}"):
        sources._call(good, {"m": 2}, "data")
    buggy = sources.import_object("userdata:buggy", "data")
    with pytest.raises(TypeError, match="colour"):
        sources._call(buggy, {}, "data")
    # Options passed on through **kwargs can only be judged by the error they raise.
    (tmp_path / "userkw.py").write_text(
        "import torch\ndef passes(**options):\n    return torch.ones(2, 5, **options)\n"
    )
    passes = sources.import_object("userkw:passes", "data")
    with pytest.raises(l3d.L3DError, match=r"data: bad options \{'colour': 1\}"):
        sources._call(passes, {"colour": 1}, "data")


def test_a_failed_analyze_leaves_no_out_folder_of_its_own(finished_run, tmp_path, capsys):
    """`--n-top` at the sample count is refused after --out was made: an empty folder stayed."""
    out = tmp_path / "sub" / "analysis"
    assert main(["analyze", str(finished_run), "--out", str(out), "--n-top", "200", "-q"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out.parent.exists()
    (tmp_path / "mine").mkdir()  # a folder the command did not make is kept
    assert main(["analyze", str(finished_run), "--out", str(tmp_path / "mine"), "--n-top", "200",
                 "-q"]) == 2  # fmt: skip
    assert (tmp_path / "mine").is_dir()


def test_failed_intervene_and_control_leave_no_folder_of_their_own(finished_run, tmp_path, capsys):
    """A subnetwork out of range, or a damaged decomposition, was refused after RUN/interventions
    or RUN/controls had been made: an empty folder stayed in the run."""
    import shutil

    run = shutil.copytree(finished_run, tmp_path / "run")
    for name in ("interventions", "controls"):
        shutil.rmtree(run / name, ignore_errors=True)
    assert main(["intervene", str(run), "--subnetwork", "7", "--delta", "1", "-q"]) == 2
    assert not (run / "interventions").exists()
    (run / "decomposition" / "config.yaml").write_text("n_v: [")
    assert main(["control", str(run), "-q"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (run / "controls").exists()


@pytest.mark.parametrize("edited", ["config.yaml", "decomposition/config.yaml"])
def test_a_run_whose_two_configs_disagree_is_named(finished_run, tmp_path, capsys, edited):
    """per_token edited in decomposition/config.yaml failed with `per_token=True needs outputs
    shaped (batch, seq, vocab)`, naming no file; edited in config.yaml, analyze, intervene and
    report ran on as if nothing had changed."""
    import shutil

    run = shutil.copytree(finished_run, tmp_path / "run")
    if not (run / "analysis" / "analysis.json").is_file():  # report reads an analysis if made
        assert main(["analyze", str(run), "-q"]) == 0
    path = run / edited
    path.write_text(path.read_text().replace("per_token: false", "per_token: true"))
    for argv in (["analyze", str(run)], ["intervene", str(run), "--subnetwork", "0", "--delta",
                 "1"], ["report", str(run)]):  # fmt: skip
        capsys.readouterr()
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err
        change = "false -> true" if edited != "config.yaml" else "true -> false"
        assert err.count("\n") == 1 and f"per_token: {change}" in err, err
        assert "decomposition/config.yaml" in err and "edited" in err, err


def test_l3d_warnings_are_one_line_on_the_command_line(finished_run, tmp_path, capsys):
    """A decomposition without a weights fingerprint: Python's warning format printed the
    message with a file, a line number and the source line of the warn call."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    meta_path = run / "decomposition" / "decomposition.json"
    meta = json.loads(meta_path.read_text())
    meta["w0_fingerprint"] = None
    meta_path.write_text(json.dumps(meta))
    assert main(["intervene", str(run), "--subnetwork", "0", "--delta", "1", "-q"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "fingerprint" in line]
    assert lines and all(line.startswith("l3d intervene: warning: ") for line in lines), err
    assert "warnings.warn" not in err and "UserWarning" not in err


@pytest.mark.parametrize(
    ("labels", "class_names", "said"),
    [
        ("images", None, "labels tensor 'images' is shaped (6, 1, 2, 2): give one label per input"),
        ("labels", ["a", "b", "c"], "3 class_names for labels up to 9: name every class"),
    ],
)
def test_labels_that_cannot_label_the_inputs_are_refused_before_the_run(
    tmp_path, capsys, labels, class_names, said
):
    """labels naming the image tensor passed --check and the run, then `l3d analyze` died with
    `TypeError: unhashable type: 'list'`; 3 class_names for 10 classes named some labels only."""
    from safetensors.torch import save_file

    save_file(
        {"images": torch.randn(6, 1, 2, 2), "labels": torch.tensor([0, 9, 2, 3, 4, 5])},
        str(tmp_path / "imgs.safetensors"),
    )
    data = {"file": str(tmp_path / "imgs.safetensors"), "options": {"key": "images"}}
    data |= {"labels": labels, "class_names": class_names}
    source = runs.DataSource(**data)
    with pytest.raises(l3d.L3DError, match=re.escape(said)):
        runs.build_labels(source)
    (tmp_path / "m.py").write_text(
        "import torch\ndef make():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))\n"
    )
    model = {"python": str(tmp_path / "m.py") + ":make"}
    spec = {"model": model, "data": data, "l3d": {"params": ["1.weight"], "n_subnetworks": 2}}
    config = _write(tmp_path / "c.yaml", spec)
    for argv in (["--check"], ["--out", str(tmp_path / "run")]):
        assert main(["decompose", str(config), *argv, "-q"]) == 2
        assert said in capsys.readouterr().err
