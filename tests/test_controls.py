"""Controls (l3d.controls, `l3d control`): the shuffled-weights network is a permutation of each
tensor, the comparison flags small gaps by its stated margins, cross-seed stability matches
permuted and sign-flipped subnetworks, and `l3d control` runs both controls as resumable run
folders whose results the report shows."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import stopped_after_epoch
from l3d import controls, runs
from l3d.cli import main
from l3d.core.subnetworks import Subnetworks

TINY = {
    "model": {"python": "l3d.toys:TMS", "options": {"n_features": 5, "n_hidden": 2}},
    "data": {"toy": "tms", "options": {"n_samples": 200, "seed": 1}},
    "l3d": {"params": ["W_in", "W_out", "b"], "n_subnetworks": 5, "epochs": 3, "batch_size": 50},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shuffled_parameters_are_seeded_permutations_of_each_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    controls.shuffle_parameters_(model, seed=7)
    again = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    again.load_state_dict(before)
    controls.shuffle_parameters_(again, seed=7)
    for name, p in model.named_parameters():
        assert torch.equal(p.flatten().sort().values, before[name].flatten().sort().values), name
        if p.numel() >= 10:  # a few entries may be permuted onto themselves by chance
            assert not torch.equal(p, before[name]), name
        assert torch.equal(p, dict(again.named_parameters())[name])  # the seed decides it
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    other.load_state_dict(before)
    controls.shuffle_parameters_(other, seed=8)
    assert not torch.equal(other[0].weight, model[0].weight)


def test_compare_flags_gaps_below_the_stated_margins():
    mine = {"loss_pooled_squared": 0.2, "median_intervention_selectivity": 30.0, "purity": 0.9}
    control = {"loss_pooled_squared": 0.05, "median_intervention_selectivity": 20.0, "purity": 0.5}
    rows = {r["metric"]: r for r in controls.compare(mine, control)}
    assert (
        rows["loss_pooled_squared"]["flagged"] is False and "gap" not in rows["loss_pooled_squared"]
    )
    assert rows["median_intervention_selectivity"]["gap"] == pytest.approx(1.5)
    assert rows["median_intervention_selectivity"]["flagged"]  # 1.5 < SMALL_GAP_SELECTIVITY
    assert rows["purity"]["gap"] == pytest.approx(0.4) and not rows["purity"]["flagged"]
    assert "mean_matched_share" not in rows  # only metrics both sides have
    clear = controls.compare(
        {"median_intervention_selectivity": 30.0}, {"median_intervention_selectivity": 3.0}
    )
    assert clear[0]["gap"] == pytest.approx(10.0) and not clear[0]["flagged"]


def test_subnetwork_cosines_equal_the_dense_directions_cosines():
    shapes = {"w": (4, 3), "b": (4,)}
    a = Subnetworks(shapes, 5, {"w": 2, "b": 1}, "cp", torch.Generator().manual_seed(1))
    b = Subnetworks(shapes, 3, {"w": 2, "b": 1}, "cp", torch.Generator().manual_seed(2))
    with torch.no_grad():
        da, db = a.materialize_flat().double(), b.materialize_flat().double()
    dense = (da / da.norm(dim=1, keepdim=True)) @ (db / db.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(controls.subnetwork_cosines(a, b), dense)


def test_stability_finds_permuted_and_sign_flipped_subnetworks():
    rows = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    moved = -rows[[2, 0, 3, 1]]
    found = controls.stability(rows, moved)
    assert found["mmcs"] == pytest.approx(1.0) and not found["flagged"]
    noise = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    assert controls.stability(rows, noise)["flagged"]


def test_resolved_spec_has_no_shuffle_seed_unless_given():
    """Checkpoints made before the field existed keep their config hash."""
    spec = runs.RunSpec.create(TINY)
    assert "shuffle_seed" not in spec.resolved()["model"]
    shuffled = runs.RunSpec.create({**TINY, "model": {**TINY["model"], "shuffle_seed": 3}})
    assert shuffled.resolved()["model"]["shuffle_seed"] == 3


def test_l3d_control_runs_both_controls_and_the_report_shows_them(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["decompose", str(config), "--out", str(run), "-q"]) == 0
    assert main(["control", str(run), "-q"]) == 0
    result = json.loads((run / "controls" / "controls.json").read_text())
    # The shuffled control decomposes a permutation of every tensor of the run's model.
    parent, shuffled = (runs.open_run(p) for p in (run, run / "controls" / "shuffled"))
    assert shuffled.spec.model.shuffle_seed is not None
    for p, q in zip(parent.model.parameters(), shuffled.model.parameters()):
        assert torch.equal(p.detach().flatten().sort().values, q.detach().flatten().sort().values)
    assert not torch.equal(parent.model.W_in, shuffled.model.W_in)
    metrics = [r["metric"] for r in result["shuffled"]["comparison"]]
    assert metrics[:2] == ["loss_pooled_squared", "live_subnetworks"]
    control_summary = json.loads(
        (run / "controls" / "shuffled" / "analysis" / "analysis.json").read_text()
    )["summary"]
    assert result["shuffled"]["metrics"]["loss_pooled_squared"] == pytest.approx(
        control_summary["loss_pooled_squared"]
    )
    # The seed control is the same run at the next seed; its stability is the matched |cos|.
    second = runs.open_run(run / "controls" / "seed")
    assert second.spec.l3d.seed == parent.spec.l3d.seed + 1
    expected = controls.decomposition_stability(parent.decomposition, second.decomposition)
    assert result["seed"]["matched_cosines"] == pytest.approx(expected["matched_cosines"])
    assert (run / "controls" / "controls.md").read_text().startswith("# Controls")
    # Again: the finished controls are reused, not run again.
    stamp = (run / "controls" / "seed" / "decomposition" / "decomposition.json").stat().st_mtime
    assert main(["control", str(run), "-q"]) == 0
    after = (run / "controls" / "seed" / "decomposition" / "decomposition.json").stat().st_mtime
    assert after == stamp
    assert main(["report", str(run), "-q"]) == 0
    index = (run / "report" / "index.html").read_text()
    assert "<h2>Controls</h2>" in index and "Cross-seed stability" in index
    # A control of a control is refused in one line.
    capsys.readouterr()
    assert main(["control", str(Path(run / "controls" / "shuffled")), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "itself a shuffled control" in err


def test_controls_of_an_auto_run_keep_its_number_of_subnetworks(tmp_path, monkeypatch):
    """With n_subnetworks: auto the controls take the parent run's chosen count (choosing again
    on a shuffled network would compare different counts)."""
    from l3d import decomposition

    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump({**TINY, "l3d": {**TINY["l3d"], "n_subnetworks": "auto"}}))
    run = tmp_path / "run"
    assert main(["decompose", str(config), "--out", str(run), "-q"]) == 0
    chosen = runs.open_run(run).decomposition.n_subnetworks

    def no_second_choice(*args, **kwargs):
        raise AssertionError("a control must take the parent's count")

    monkeypatch.setattr(decomposition, "choose_n_subnetworks", no_second_choice)
    assert main(["control", str(run), "-q"]) == 0
    for kind in ("shuffled", "seed"):
        control = runs.open_run(run / "controls" / kind)
        assert control.spec.l3d.n_subnetworks == control.decomposition.n_subnetworks == chosen


def test_a_stopped_control_says_how_to_continue_and_continues(tmp_path, capsys):
    """Ctrl-C or SIGTERM during a control's decomposition: one line with the command that
    continues it (not a traceback), exit 128 + signal; that command finishes from the checkpoint."""
    TINY_LONGER = {**TINY, "l3d": {**TINY["l3d"], "epochs": 4}, "run": {"checkpoint_seconds": 0}}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_LONGER))
    run = tmp_path / "run"
    assert main(["decompose", str(config), "--out", str(run), "-q"]) == 0
    capsys.readouterr()
    with stopped_after_epoch(2):
        assert main(["control", str(run), "-q"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"l3d control {run}" in err and "2 of 4 epochs" in err, err
    assert main(["control", str(run), "-q"]) == 0
    records = runs.RunDir(run / "controls" / "shuffled").metrics_records()
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]


def _tiny_run(tmp_path: Path, **l3d_changes) -> tuple[Path, Path]:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "l3d": {**TINY["l3d"], **l3d_changes}}))
    run = tmp_path / "run"
    assert main(["decompose", str(config), "--out", str(run), "-q", "--overwrite"]) == 0
    return config, run


def test_controls_of_an_earlier_run_in_the_folder_are_not_reused(tmp_path):
    """`l3d decompose --overwrite` starts the folder over, controls included; and controls made
    for another run (copied in, or from an older version) are decomposed again for this one (not
    5 subnetworks against its 3)."""
    import shutil

    _tiny_run(tmp_path)
    run = tmp_path / "run"
    assert main(["control", str(run), "-q"]) == 0
    shutil.copytree(run / "controls", tmp_path / "old_controls")
    _tiny_run(tmp_path, n_subnetworks=3)
    assert not (run / "controls").exists()
    shutil.copytree(tmp_path / "old_controls", run / "controls")
    assert main(["control", str(run), "-q"]) == 0
    for kind in ("shuffled", "seed"):
        assert runs.open_run(run / "controls" / kind).decomposition.n_subnetworks == 3
    result = json.loads((run / "controls" / "controls.json").read_text())
    assert result["shuffled"]["metrics"]["live_subnetworks"] <= 3
    assert len(result["seed"]["matched_cosines"]) <= 3


def test_controls_compare_analyses_made_the_same_way(tmp_path):
    """A run analysed with other options (fewer samples, more top samples) is compared with its
    controls through a default analysis of its own (RUN_DIR/controls/analysis), never its custom
    one against the controls' default ones; the user's analysis is left as it was."""
    _, run = _tiny_run(tmp_path)
    assert main(["analyze", str(run), "--n-samples", "20", "--n-top", "15", "-q"]) == 0
    custom = (run / "analysis" / "analysis.json").read_bytes()
    assert main(["control", str(run), "-q"]) == 0
    assert (run / "analysis" / "analysis.json").read_bytes() == custom
    result = json.loads((run / "controls" / "controls.json").read_text())
    default = json.loads((run / "controls" / "analysis" / "analysis.json").read_text())["summary"]
    control = json.loads(
        (run / "controls" / "shuffled" / "analysis" / "analysis.json").read_text()
    )["summary"]
    assert default["n_top"] == control["n_top"] == 10
    assert default["n_samples"] == control["n_samples"] == TINY["data"]["options"]["n_samples"]
    assert result["run"] == controls.headline(default)


def test_running_one_kind_keeps_the_other_kinds_results(tmp_path):
    _, run = _tiny_run(tmp_path)
    assert main(["control", str(run), "-q"]) == 0
    assert main(["control", str(run), "--kinds", "seed", "-q"]) == 0
    result = json.loads((run / "controls" / "controls.json").read_text())
    assert {"shuffled", "seed"} <= result.keys()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{}", "summary"),
        ("[]", "JSON object"),
        ('{"summary": {}, "subnetworks": []}', "n_subnetworks"),
    ],
)
def test_a_hand_edited_control_analysis_is_one_line(tmp_path, capsys, text, message):
    _, run = _tiny_run(tmp_path)
    assert main(["control", str(run), "-q"]) == 0
    edited = run / "controls" / "seed" / "analysis" / "analysis.json"
    edited.write_text(text)
    capsys.readouterr()
    assert main(["control", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(edited) in err and message in err, err


def test_a_selectivity_that_is_not_a_number_is_one_line(tmp_path, capsys):
    _, run = _tiny_run(tmp_path)
    assert main(["control", str(run), "-q"]) == 0
    edited = run / "controls" / "shuffled" / "analysis" / "analysis.json"
    analysis = json.loads(edited.read_text())
    analysis["summary"]["median_intervention_selectivity"] = "abc"
    edited.write_text(json.dumps(analysis))
    capsys.readouterr()
    assert main(["control", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "median_intervention_selectivity" in err, err


def test_a_file_in_place_of_the_controls_folder_names_the_fix(tmp_path, capsys):
    _, run = _tiny_run(tmp_path)
    (run / "controls").write_text("x")
    capsys.readouterr()
    assert main(["control", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "move or delete" in err, err
