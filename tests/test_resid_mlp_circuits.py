"""Why the resid_mlp experiment decomposes the peers' bias-free ResidMLP with two subnetworks per
feature: a single-feature sample's gradient is rank 1 in each weight matrix, fixed in direction for
each sign of the feature, and the two signs use disjoint neurons (orthogonal directions)."""

import torch

from l3d.toys import ResidMLP


def _gradient(model: ResidMLP, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """grad_W of the MSE between f(x) and a zero reference output."""
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))


def test_bias_free_model_has_only_the_two_weight_matrices():
    assert [n for n, _ in ResidMLP(20, 100, 10, bias=False).named_parameters()] == [
        "mlp_in.weight",
        "mlp_out.weight",
    ]


def test_single_feature_gradients_are_rank_one_and_split_by_sign():
    model = ResidMLP(n_features=20, d_resid=100, d_mlp=10, seed=3, bias=False)
    j = 7

    def grad_at(value: float) -> dict[str, torch.Tensor]:
        x = torch.zeros(1, 20)
        x[0, j] = value
        return _gradient(model, x)

    pos, pos_small, neg = grad_at(0.9), grad_at(0.3), grad_at(-0.6)
    for name in pos:
        s = torch.linalg.svdvals(pos[name])
        assert s[1] < 1e-5 * s[0], name  # rank 1 in each matrix
        # ReLU without bias is positively homogeneous: the direction does not depend on |x_j| ...
        assert _cos(pos[name], pos_small[name]) > 1 - 1e-5, name
        # ... but x_j < 0 switches on the complementary neurons: an orthogonal direction.
        assert abs(_cos(pos[name], neg[name])) < 1e-5, name
