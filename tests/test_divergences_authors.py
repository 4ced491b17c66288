"""'mse_authors': the per-sample gradient the authors' toy code decomposes,
grad_W [1/2 MSE(f(x_i), y_ref) + 1/2 MSE(f(x_i), 0)] with y_ref detached."""

import pytest
import torch

from l3d.core.divergences import DIVERGENCES, get_divergence
from l3d.core.gradients import GradientSource
from l3d.core.model import Target
from l3d.core.samples import Dataset
from l3d.core.subnetworks import Subnetworks
from l3d.toys import TMCS

NAMES = ["W_in", "W_out", "b"]


def loop_gradients(model: TMCS, x: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """(n, n_w): one backward pass per sample of 1/2 MSE(f_i, r_i) + 1/2 MSE(f_i, 0)."""
    rows = []
    for x_i, r_i in zip(x, refs):
        model.zero_grad()
        y = model(x_i[None])[0]
        (0.5 * (y - r_i).pow(2).mean() + 0.5 * y.pow(2).mean()).backward()
        rows.append(torch.cat([dict(model.named_parameters())[n].grad.flatten() for n in NAMES]))
    return torch.stack(rows)


def projections(model: TMCS, x: torch.Tensor, refs: torch.Tensor, divergence: str, method: str):
    """<V_k, g_i> (n, n_v) from the library's gradient source, and the subnetworks V."""
    source = GradientSource(
        Target.create(model, NAMES),
        divergence,
        lambda outputs, generator: refs,
        dataset=Dataset(x, batch_size=len(x)),
        per_token=False,
        method=method,
        chunk_size=None,
    )
    (batch,) = source.epoch(torch.Generator().manual_seed(0), shuffle=False)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    v = Subnetworks(shapes, 40, dict.fromkeys(NAMES, 2), "cp", torch.Generator().manual_seed(1))
    return batch.project(v).detach(), v.materialize_flat().detach()


@pytest.mark.parametrize("method", ["jacobian", "vmap", "structured"])
def test_mse_authors_gradient_matches_backward_loop_and_differs_from_mse(method):
    torch.manual_seed(0)
    model = TMCS(seed=0)
    with torch.no_grad():
        model.b.fill_(0.5)  # every output unit active, so every parameter gets gradient
    x, refs = torch.rand(6, 10), 3 * torch.rand(6, 10)
    # 40 generic directions span the 110-dim parameter space well enough to tell gradients apart.
    c_authors, v = projections(model, x, refs, "mse_authors", method)
    expected = loop_gradients(model, x, refs) @ v.T
    torch.testing.assert_close(c_authors, expected, rtol=1e-4, atol=1e-5)
    c_mse, _ = projections(model, x, refs, "mse", method)
    assert (c_authors - c_mse).norm() > 0.1 * c_mse.norm()
    # Its gradient is that of MSE to half the reference (the docstring's identity).
    c_half, _ = projections(model, x, refs / 2, "mse", method)
    torch.testing.assert_close(c_authors, c_half, rtol=1e-4, atol=1e-5)


def test_mse_authors_is_a_named_divergence():
    assert get_divergence("mse_authors") is DIVERGENCES["mse_authors"]
