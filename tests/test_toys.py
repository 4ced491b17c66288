"""Toy models and their data (Section 3, Appendix B.3)."""

import pytest
import torch

from l3d.errors import L3DError
from l3d.toys import (
    TMCS,
    TMS,
    ResidMLP,
    Squares,
    feature_groups,
    grouped_features,
    resid_mlp_labels,
    sparse_features,
    train_toy,
)
from l3d.toys.registry import TOYS, get_toy


def test_sparse_features_have_no_empty_rows_and_the_right_density():
    x = sparse_features(20_000, 5, p_active=0.05, generator=torch.Generator().manual_seed(0))
    active = x > 0
    assert active.any(1).all()
    # Redrawing empty rows conditions on >= 1 active: P(active) = 0.05 / (1 - 0.95^5).
    assert abs(active.float().mean().item() - 0.05 / (1 - 0.95**5)) < 0.01
    assert x.max() <= 1 and x.min() >= 0


def test_grouped_features_are_active_together():
    x = grouped_features(5000, 5, 5, generator=torch.Generator().manual_seed(1))
    active = (x > 0).view(5000, 5, 5)
    assert (active.all(2) == active.any(2)).all()
    assert active.any(2).any(1).all()


def test_signed_features_for_squares():
    x = sparse_features(5000, 5, low=-1.0, generator=torch.Generator().manual_seed(2))
    assert (x < 0).any() and (x > 0).any() and x.abs().max() <= 1


def test_feature_groups():
    assert feature_groups(4, 2).tolist() == [[True, True, False, False], [False, False, True, True]]


def test_tms_training_embeds_every_feature_of_a_good_init():
    x = sparse_features(10_000, 5, generator=torch.Generator().manual_seed(0))
    model = TMS(5, 2, seed=1)
    log = train_toy(model, x, x, steps=2000, tied=True)
    assert log[-1] < log[0] / 5
    assert torch.allclose(model.W_out, model.W_in.T)
    assert (model.W_in.norm(dim=0) > 0.5).all()


def test_tmcs_computes_relu_of_a_linear_map():
    m = TMCS(10, 5, 10)
    x = torch.rand(3, 10)
    expected = torch.relu(x @ m.W_in.T @ m.W_out.T + m.b)
    assert torch.allclose(m(x), expected)


def test_squares_shapes_and_hidden_parameters():
    m = Squares()
    assert m(torch.zeros(4, 5)).shape == (4, 5)
    assert len(m.layers) == 5
    hidden = m.hidden_parameters()
    assert "layers.0.weight" not in hidden and "layers.4.bias" not in hidden
    assert "layers.2.weight" in hidden
    code = Squares(width=10, activation="elu", activate_output=True)
    assert (code.layers[0].bias >= 0.01).all()


def test_resid_mlp_identity_path_and_labels():
    m = ResidMLP(n_features=20, d_resid=100, d_mlp=10)
    with torch.no_grad():
        m.mlp_out.weight.zero_()
        m.mlp_out.bias.zero_()
    x = torch.zeros(1, 20)
    x[0, 3] = 0.5
    # With the MLP silenced, the output is W_E^T W_E x: feature 3 read back exactly (unit columns).
    assert torch.isclose(m(x)[0, 3], torch.tensor(0.5), atol=1e-6)
    assert [n for n, _ in m.named_parameters()] == [
        "mlp_in.weight",
        "mlp_in.bias",
        "mlp_out.weight",
        "mlp_out.bias",
    ]
    assert torch.equal(resid_mlp_labels(torch.tensor([-1.0, 2.0])), torch.tensor([-1.0, 4.0]))


def test_registry_makes_each_named_toy_and_names_close_matches():
    for name, spec in TOYS.items():
        x = spec.sample(8, torch.Generator().manual_seed(0))
        model, label, _ = spec.make(0)
        assert x.shape[1] == spec.units.shape[1], name
        assert model(x).shape == label(x).shape, name
    with pytest.raises(L3DError, match="did you mean .*tmcs"):
        get_toy("tmsc")


def test_resid_mlp_toy_is_the_peers_bias_free_mlp():
    model, _, _ = get_toy("resid_mlp").make(0)
    assert [n for n, _ in model.named_parameters()] == ["mlp_in.weight", "mlp_out.weight"]
