"""The contrastive-pair TMS demo: single-feature pairs recover each feature, mixed pairs beat the
PCA baseline, and the baselines measure what L3D decomposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from l3d.demos import contrastive_tms as demo
from l3d.pairs import off_target_scores, pair_data, pair_gradients, patching_scores
from l3d.toys.registry import get_toy, train_toy_model

REDUCED = ["--seeds", "0", "--epochs", "30", "--single-pairs", "300", "--mixed-pairs", "500"]


def test_reduced_demo_recovers_single_features_and_beats_pca_on_mixed_pairs(tmp_path, capsys):
    metrics = demo.main(["--out", str(tmp_path), *REDUCED])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["targets"] == metrics["targets"]
    (r,) = saved["results"]
    single, mixed = r["single_feature"], r["mixed"]
    assert min(single["l3d_1"]) >= 0.9 and min(single["l3d_2"]) >= 0.9
    assert min(mixed["l3d"]["share"]) > max(mixed["pca"]["share"])
    assert sum(mixed["l3d"]["share"]) > sum(mixed["random"]["share"])
    assert sorted(mixed["l3d"]["assignment"]) == [0, 1, 2, 3, 4]  # one subnetwork per feature
    assert set(mixed["ablations"]) == set(demo.ABLATIONS)
    for method in demo.METHODS:
        assert all(0 <= s <= 1 for s in r["patching"][method]["own"])
    # each matched subnetwork closes its own feature's pairs more than its step, applied to the
    # other features' pairs, closes theirs
    assert all(
        o > f for o, f in zip(r["patching"]["l3d"]["own"], r["patching"]["l3d"]["off_target"])
    )
    assert all(f <= 1 for m in demo.METHODS for f in r["patching"][m]["off_target"])
    assert saved["environment"]["threads"] == 1
    summary = (tmp_path / "summary.md").read_text()
    printed = capsys.readouterr().out
    for text in (summary, printed):
        assert "| seed | single: L3D n_v=1 | L3D n_v=2 | PCA | mixed: L3D |" in text
        assert "Targets: single_feature_recovered yes" in text


def test_baselines_use_the_pair_gradients_l3d_decomposes(tmp_path):
    toy = train_toy_model(get_toy("tms"), 1, cache=tmp_path / "toy")
    g = torch.Generator().manual_seed(0)
    x, counterparts, zeroed = demo.mixed_pairs(toy, 64, g)
    assert ((x > 0).sum(1) - (counterparts > 0).sum(1) == 1).all()
    assert (counterparts[torch.arange(64), zeroed] == 0).all() and (
        x[torch.arange(64), zeroed] > 0
    ).all()
    d = demo.l3d_pairs(toy.model, x, counterparts, 2, 0, {**demo.L3D, **demo.SINGLE, "epochs": 1})
    data = pair_data(toy.model, x, counterparts)
    ours = pair_gradients(d, x, counterparts)
    theirs = d.gradient_source(data.inputs).batch(data.inputs, data.references, g).dense()
    for name in demo.PARAMS:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
    # the top singular directions are orthonormal; random ones unit norm, rank 1 per matrix
    pca = demo.singular_directions(ours, 3)
    flat = torch.cat([pca[p].flatten(1) for p in demo.PARAMS], 1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(3), atol=1e-5, rtol=0)
    rand = demo.random_directions(d.shapes, 4, 1, g)
    norms = sum(t.flatten(1).pow(2).sum(1) for t in rand.values())
    torch.testing.assert_close(norms, torch.ones(4))
    assert all(torch.linalg.matrix_rank(m) == 1 for m in rand["W_in"])
    # baselines are scored by patching_scores along given directions: its subnetworks, given as
    # directions, score as the subnetworks themselves
    deltas = torch.linspace(-2, 2, 9) * d.weight_norm()
    expected = patching_scores(d, x, counterparts, deltas=deltas)
    given = [d.v_out(k) for k in range(2)]
    scores = patching_scores(d, x, counterparts, deltas=deltas, directions=given)
    torch.testing.assert_close(scores, expected)


def test_off_target_is_the_other_features_share_at_the_own_features_best_step(tmp_path):
    toy = train_toy_model(get_toy("tms"), 1, cache=tmp_path / "toy")
    g = torch.Generator().manual_seed(0)
    held_out = demo.mixed_pairs(toy, 200, g)
    d = demo.l3d_pairs(toy.model, *held_out[:2], 5, 0, {**demo.L3D, **demo.SINGLE, "epochs": 1})
    directions = [d.v_out(k) for k in range(5)]
    assignment = [2, 0, 1, 4, 3]
    deltas = torch.linspace(-2, 2, 9) * d.weight_norm()
    result = demo.patching(d, directions, held_out, assignment, deltas)
    x, counterparts, zeroed = held_out
    pairs = [pair_data(d.model, x[zeroed == j], counterparts[zeroed == j]) for j in range(5)]
    for j, k in enumerate(assignment):
        own = patching_scores(d, pairs[j], deltas=deltas, directions=[directions[k]])
        assert result["own"][j] == pytest.approx(float(own[0]))
        # off_target_scores on each other feature's pairs (the target's step), not their own
        # best step (patching_scores), averaged over the other features
        off = [
            float(
                off_target_scores(d, pairs[j], pairs[i], deltas=deltas, directions=[directions[k]])[
                    0
                ]
            )
            for i in range(5)
            if i != j
        ]
        assert result["off_target"][j] == pytest.approx(sum(off) / 4)


def test_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    doc = (Path(__file__).parents[1] / "docs" / "contrastive.md").read_text()
    block = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("L3D_CACHE", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(block, "docs/contrastive.md", "exec"), namespace)
    assert float(namespace["share"][0, 0]) > 0.99  # the comment's "about [[0.994, 0, ...]]"
    assert namespace["coeffs"].shape == (300, 1)
    assert ((namespace["d5"].p_active - 0.2).abs() < 0.05).all()
    assert capsys.readouterr().out.rstrip().endswith("counterpart")
    assert (tmp_path / "runs/tms-pairs").is_dir()


@pytest.mark.slow
def test_demo_meets_every_target_on_three_seeds(tmp_path):
    metrics = demo.main(["--out", str(tmp_path)])
    assert metrics["targets"] == {
        "single_feature_recovered": True,
        "mixed_recovered": True,
        "mixed_beats_pca": True,
    }
    for r in metrics["results"]:
        assert min(r["mixed"]["l3d"]["share"]) >= 0.9
        assert max(r["mixed"]["pca"]["share"]) < 0.9
        assert min(r["patching"]["l3d"]["own"]) > 0.95
