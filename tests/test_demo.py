"""The README's main job writes its table, figures and a reloadable decomposition."""

from __future__ import annotations

import json

import pytest

import l3d
from l3d.demos import tms as demo
from l3d.toys import TMS


def test_demo_writes_outputs_and_reloads(tmp_path):
    metrics = demo.main(["--out", str(tmp_path), "--epochs", "2", "--quiet"])
    for name in ("summary.md", "metrics.json", "subnetworks.png", "training_curve.png",
                 "p_active.png"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    assert len(list(tmp_path.glob("toy/tms-seed1-*.safetensors"))) == 1  # the registry's cache
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["features_recovered"] == metrics["features_recovered"]
    assert sorted(r["feature"] for r in saved["matching"]) == [0, 1, 2, 3, 4]
    assert "| subnetwork | matched feature |" in (tmp_path / "summary.md").read_text()
    loaded = l3d.load(tmp_path / "decomposition", TMS())
    assert loaded.n_subnetworks == 5
    # a second run reuses the cached toy model
    again = demo.main(["--out", str(tmp_path), "--epochs", "1", "--quiet"])
    assert again["toy_seed"] == metrics["toy_seed"]


@pytest.mark.slow
def test_demo_recovers_every_feature_at_paper_settings(tmp_path):
    metrics = demo.main(["--out", str(tmp_path), "--quiet"])
    assert metrics["features_recovered"] == 5
    assert all(r["norm_share"] > 0.95 for r in metrics["matching"])
