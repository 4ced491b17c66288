"""Each concept has one definition, used by every caller: regressions of the bugs that copies caused
(two impacts, an output change measured with the training divergence, a validation forward per
coefficients call)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import l3d
from l3d.cli import main
from l3d.core.divergences import DIVERGENCES


@pytest.fixture(scope="module")
def mlp_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return net, torch.randn(40, 4)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_output_change_is_zero_at_delta_zero_for_every_divergence(mlp_data, divergence):
    net, x = mlp_data
    d = l3d.decompose(
        net, x, params=["0.weight", "2.weight"], n_subnetworks=3, epochs=1,
        batch_size=20, divergence=divergence, progress=False,
    )  # fmt: skip
    change = d.output_change(x, 1, [0.0, 0.5])
    assert change.shape == (2, 40)
    assert torch.equal(change[0], torch.zeros(40))  # 'mse_authors' alone is not 0 at equal outputs
    assert (change[1] > 0).all()
    base, moved = d.intervene(x, 1, 0.0), d.intervene(x, 1, 0.5)
    expected = torch.vmap(DIVERGENCES[divergence].distance_fn)(moved, base)
    torch.testing.assert_close(change[1], expected)


def test_one_coefficients_call_runs_one_validation_forward(mlp_data):
    net, x = mlp_data
    d = l3d.decompose(
        net, x, params=["0.weight", "2.weight"], n_subnetworks=3, epochs=1, batch_size=20,
        progress=False,
    )  # fmt: skip
    d = l3d.Decomposition(d.config, d.subnetworks, d.history, d.evaluation, d.model)
    calls = []
    handle = net.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        d.coefficients(x[:8])
        # The gradient source's validation (three forwards: the second and third check that
        # forward is deterministic) + the batch's.
        assert len(calls) == 4
        calls.clear()
        d.coefficients(x[:8], seed=3)
        assert len(calls) == 1
        calls.clear()
        d.impact(x[:8], n_references=10)
        assert len(calls) == 10  # one forward per reference, no validation
    finally:
        handle.remove()


def test_analyze_and_intervene_report_the_same_impact(tmp_path):
    spec = {
        "model": {"python": "l3d.toys:TMS", "options": {"n_features": 5, "n_hidden": 2}},
        "data": {"toy": "tms", "options": {"n_samples": 120, "seed": 1}},
        "l3d": {"params": ["W_in", "W_out", "b"], "n_subnetworks": 5, "epochs": 2},
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["decompose", str(config), "--out", str(run), "-q"]) == 0
    assert main(["analyze", str(run), "--n-samples", "100", "-q"]) == 0
    assert (
        main(
            [
                "intervene",
                str(run),
                "--subnetwork",
                "0",
                "3",
                "--delta",
                "1",
                "--n-samples",
                "100",
                "-q",
            ]
        )
        == 0
    )
    analyzed = load_file(str(run / "analysis" / "impact.safetensors"))["impact"]
    for k in (0, 3):
        intervened = json.loads((run / "interventions" / f"subnetwork_{k}.json").read_text())
        torch.testing.assert_close(torch.tensor(intervened["impact"]), analyzed[:, k])
