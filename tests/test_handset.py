"""The hand-set decomposition of a toy (each unit's exact gradient direction) against a brute-force
loop of backward() calls, on the bias-free ResidMLP whose single-feature gradients are rank 1."""

import pytest
import torch

import l3d
from l3d.errors import L3DError
from l3d.experiments import metrics as M
from l3d.experiments.handset import PROBE_VALUE, hand_set_decomposition
from l3d.toys import ResidMLP, feature_groups, sparse_features
from l3d.toys.registry import Toy

pytestmark = pytest.mark.usefixtures("one_thread")

N_FEATURES = 12


def resid_toy(low: float) -> Toy:
    model = ResidMLP(n_features=N_FEATURES, d_resid=40, d_mlp=8, seed=3, bias=False).eval()

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        return sparse_features(n, N_FEATURES, 0.1, low, 1.0, generator)

    return Toy(model, feature_groups(N_FEATURES), sample)


def like(toy: Toy, data: torch.Tensor, **options) -> l3d.Decomposition:
    names = [n for n, _ in toy.model.named_parameters()]
    return l3d.decompose(
        toy.model, data, params=names, n_subnetworks=6, epochs=1, progress=False, **options
    )


def brute_force_direction(model: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """grad_W of the MSE between f(probe) and f(0), one backward() call, flattened, unit norm."""
    reference = model(torch.zeros_like(probe)).detach()
    model.zero_grad()
    torch.nn.functional.mse_loss(model(probe), reference).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    return g / g.norm()


def test_each_subnetwork_is_its_units_gradient_direction_per_sign():
    toy = resid_toy(low=-1.0)
    data = toy.sample(200, torch.Generator().manual_seed(0))
    learned = like(toy, data)
    hand_set = hand_set_decomposition(toy, learned, data, seed=0)

    # Inputs take both signs: one subnetwork per feature and sign, V_in = V_out, unit norm.
    assert hand_set.n_subnetworks == 2 * N_FEATURES
    with torch.no_grad():
        v_out = hand_set.subnetworks.v_out.materialize_flat()
        v_in = hand_set.subnetworks.v_in.materialize_flat()
    torch.testing.assert_close(v_in, v_out)
    torch.testing.assert_close(v_out.norm(dim=1), torch.ones(2 * N_FEATURES))
    for k in range(2 * N_FEATURES):
        probe = torch.zeros(1, N_FEATURES)
        probe[0, k % N_FEATURES] = PROBE_VALUE if k < N_FEATURES else -PROBE_VALUE
        expected = brute_force_direction(toy.model, probe)
        # rank 1 (the learned decomposition's) fits a single feature's rank-1 gradient exactly
        assert float(v_out[k] @ expected) > 1 - 1e-5, k
    # As many subnetworks per sample stay active: 0.1 of 6 -> 0.025 of 24.
    assert hand_set.config.top_k == pytest.approx(0.1 * 6 / 24)
    assert hand_set.evaluation.loss_pooled_squared == pytest.approx(
        hand_set.evaluate(data, seed=0).loss_pooled_squared
    )
    # Each probe's own subnetwork carries its attribution (the probe's sign is positive).
    probe = M.one_hot_probe(hand_set, toy.units)
    assert probe["assignment"] == list(range(N_FEATURES))


def test_non_negative_inputs_give_one_subnetwork_per_unit():
    toy = resid_toy(low=0.0)
    data = toy.sample(200, torch.Generator().manual_seed(0))
    hand_set = hand_set_decomposition(toy, like(toy, data), data, seed=0)
    assert hand_set.n_subnetworks == N_FEATURES


def test_tucker_factors_are_refused():
    toy = resid_toy(low=0.0)
    data = toy.sample(200, torch.Generator().manual_seed(0))
    learned = like(toy, data, factorization="tucker")
    with pytest.raises(L3DError, match="factorization=cp"):
        hand_set_decomposition(toy, learned, data, seed=0)
