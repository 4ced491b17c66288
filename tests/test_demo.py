"""The README's main job: the improved TMS decomposition beside the paper-setting one, its table,
figures and reloadable decompositions."""

from __future__ import annotations

import json

import pytest

import l3d
from l3d.demos import tms as demo
from l3d.experiments.registry import get_spec
from l3d.experiments.runner import with_epochs
from l3d.toys.registry import get_toy, train_toy_model


def test_demo_runs_both_settings_and_writes_outputs_that_reload(tmp_path, capsys):
    metrics = demo.main(["--out", str(tmp_path), "--epochs", "2", "--quiet"])
    for name in ("summary.md", "metrics.json", "subnetworks.png", "training_curve.png",
                 "p_active.png"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    assert len(list(tmp_path.glob("toy/tms-seed1-*.safetensors"))) == 1  # the registry's cache
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["features_recovered"] == metrics["features_recovered"]
    # the main result is the experiment registry's improved TMS profile, the paper's beside it
    spec = get_spec("tms")
    for result, profile in ((saved, spec.improved), (saved["paper_settings"], spec.paper)):
        assert result["config"] == with_epochs(profile, 2)  # --epochs rescales the schedule
        assert [r["feature"] for r in result["matching"]] == [0, 1, 2, 3, 4]
        assert sorted(r["subnetwork"] for r in result["matching"]) == [0, 1, 2, 3, 4]
    assert saved["config"]["loss"] == "pooled_squared" and saved["config"]["top_k"] == 0.25
    assert saved["paper_settings"]["config"]["loss"] == "paper"
    assert saved["paper_reports"] == {"loss_pooled_squared": 0.19}
    printed = capsys.readouterr().out
    summary = (tmp_path / "summary.md").read_text()
    for text in (printed, summary):
        assert (
            "| feature | improved settings: subnetwork | norm share | P_act | paper settings"
            in text
        )
        assert "| | improved settings | paper settings | the paper |" in text
        loss = saved["held_out"]["loss_pooled_squared"]
        paper_loss = saved["paper_settings"]["held_out"]["loss_pooled_squared"]
        assert f"| {loss:.3f} | {paper_loss:.3f} | 0.19 |" in text
    model = train_toy_model(get_toy("tms"), 1, cache=tmp_path / "toy").model  # the cached toy
    for folder in ("decomposition", "paper_settings/decomposition"):
        loaded = l3d.load(tmp_path / folder, model)
        assert loaded.n_subnetworks == 5
    assert l3d.load(tmp_path / "decomposition", model).config.loss == "pooled_squared"
    # a second run reuses the cached toy model
    again = demo.main(["--out", str(tmp_path), "--epochs", "1", "--quiet"])
    assert again["toy_seed"] == metrics["toy_seed"]


@pytest.mark.slow
def test_demo_recovers_every_feature_and_beats_the_paper_at_improved_settings(tmp_path):
    metrics = demo.main(["--out", str(tmp_path), "--quiet"])
    assert metrics["features_recovered"] == 5
    assert all(r["norm_share"] > 0.95 for r in metrics["matching"])
    assert metrics["held_out"]["loss_pooled_squared"] < 0.19
    assert metrics["paper_settings"]["features_recovered"] == 5
    assert metrics["paper_settings"]["config"]["epochs"] == 1000
