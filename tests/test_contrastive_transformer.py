"""The contrastive-pair transformer demo: COPY against REVERSE prompts that differ in the task
token only; the subnetworks found in the attention's query and key weights close more of the
pairs' difference than random directions and leave the other tasks alone."""

from __future__ import annotations

import json

import pytest
import torch

from l3d.demos import contrastive_transformer as demo
from l3d.demos import synthetic_transformer as st
from l3d.pairs import decompose_pairs


def test_pairs_differ_in_the_task_token_and_the_first_answer_only():
    copy, reverse = demo.task_pairs(50, torch.Generator().manual_seed(0))
    ids, swapped = copy["input_ids"], reverse["input_ids"]
    assert ids.shape == swapped.shape == (50, st.SEQ_LEN)
    assert (ids[:, 0] == st.MARKERS["copy"]).all()
    assert (swapped[:, 0] == st.MARKERS["reverse"]).all()
    assert torch.equal(ids[:, 1:], swapped[:, 1:])
    assert (ids[:, demo.ANSWER] == st.SEP).all()
    assert (ids[:, 1] != ids[:, 5]).all()  # the two tasks' first answers (a1, a5) differ
    positions = demo.answer_positions(copy)
    assert positions.sum() == 50 and positions[:, demo.ANSWER].all()


def test_the_other_tasks_at_step_zero_are_the_models_own():
    """An untrained model at delta = 0: the other tasks' outputs do not move, and their accuracy
    is the model's own."""
    model = st.build_model(0)
    g = torch.Generator().manual_seed(1)
    train = demo.task_pairs(8, g)
    d = decompose_pairs(
        model, *train, params=demo.PARAMS, n_subnetworks=1, epochs=1, progress=False,
        positions=demo.answer_positions(train[0]), **demo.L3D,
    )  # fmt: skip
    data, tasks, answer = st.dataset(4, seed=2)
    keep = torch.isin(tasks, torch.tensor([st.TASKS.index(t) for t in demo.OTHERS]))
    others = ({k: v[keep] for k, v in data.items()}, answer[keep])
    kept = demo.other_tasks(d, *others, d.v_out(0), 0.0)
    accuracy = st.task_accuracy(model, data, tasks, answer)
    low, high = sorted(accuracy[t] for t in demo.OTHERS)  # pooled over both tasks' answers
    assert kept["kl"] == 0.0
    assert low <= kept["accuracy"] <= high


@pytest.mark.slow
def test_demo_switches_reverse_to_copy_unlike_random_directions(tmp_path):
    """Seed 0 at the demo's settings (minutes on one core): docs/contrastive.md's numbers."""
    metrics = demo.main(["--out", str(tmp_path), "--seeds", "0"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["targets"] == metrics["targets"]
    (r,) = saved["results"]
    assert min(r["answer_accuracy"].values()) > 0.95
    assert metrics["targets"]["patching_beats_random"]
    one_way = r["one way"]["reverse->copy"]
    assert one_way["l3d"]["switch"] > 0.9
    assert one_way["l3d"]["switch"] > one_way["random"]["switch"] + 0.3
    assert one_way["l3d"]["others_accuracy"] > one_way["random"]["others_accuracy"]
    # one subnetwork without top-k is the top singular direction, as in the TMS demo
    assert abs(one_way["l3d"]["patching"] - one_way["pca"]["patching"]) < 0.05
