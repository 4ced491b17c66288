"""The contrastive-pair digits demo: one subnetwork per class pair from an unlabelled mix of class
pairs, which turns one class into the other on held-out pairs better than random directions."""

from __future__ import annotations

import json

import torch

from l3d.demos import contrastive_digits as demo
from l3d.demos import digits_cnn

REDUCED = ["--seeds", "0", "--epochs", "10", "--n-top", "10"]


def test_reduced_demo_finds_one_subnetwork_per_class_pair(tmp_path, capsys):
    metrics = demo.main(["--out", str(tmp_path), *REDUCED])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["targets"] == metrics["targets"]
    (r,) = saved["results"]
    assert r["test_accuracy"] > 0.9
    l3d, rand = r["l3d"], r["random"]
    assert sorted(l3d["assignment"]) == [0, 1, 2]  # one subnetwork per class pair
    assert min(l3d["share"]) >= 0.8  # its top held-out pairs come from that class pair
    assert sum(l3d["patching"]) > sum(rand["patching"])
    assert sum(l3d["switch"]) > sum(rand["switch"]) + 1  # switches far more predictions
    for method in demo.METHODS:
        assert all(0 <= s <= 1 for s in r[method]["patching"] + r[method]["switch"])
        # off_target_scores: at most 1, negative where the step pushes other class pairs apart
        assert all(f <= 1 for f in r[method]["off_target"])
    # the class a subnetwork moves most is one of its class pair's
    for (a, b), up, down in zip(demo.CLASS_PAIRS, l3d["pushes_up"], l3d["pushes_down"]):
        assert {*up[:1], *down[:1]} & {a, b}
    assert metrics["targets"]["patching_beats_random"] and metrics["targets"]["switch_beats_random"]
    assert len(list(tmp_path.glob("grid_seed0_subnetwork*.png"))) == 3
    printed = capsys.readouterr().out
    assert "| seed | class pair | method |" in printed
    assert "| seed | class pair | method |" in (tmp_path / "summary.md").read_text()


def test_class_pairs_pair_every_image_of_a_with_one_of_b():
    x, y, _, _ = digits_cnn.digits(0)
    inputs, counterparts, which = demo.class_pairs(x, y, torch.Generator().manual_seed(0))
    assert len(inputs) == len(counterparts) == len(which)
    for p, (a, b) in enumerate(demo.CLASS_PAIRS):
        assert int((which == p).sum()) == int((y == a).sum())
        own = {tuple(i.flatten().tolist()) for i in x[y == a]}
        other = {tuple(i.flatten().tolist()) for i in x[y == b]}
        assert all(tuple(i.flatten().tolist()) in own for i in inputs[which == p])
        assert all(tuple(i.flatten().tolist()) in other for i in counterparts[which == p])
