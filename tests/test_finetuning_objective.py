"""Selection by the edit's own objective (l3d.finetuning.objective_scores / objective_subnetworks):
the scores against a brute-force dense computation in the full parameter space, and planted
subnetworks that the selection must find."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import l3d
from conftest import SmallMLP, TinyTokenModel
from l3d.core.samples import SampleRows
from l3d.core.subnetworks import Subnetworks
from l3d.errors import L3DError
from l3d.finetuning import IGNORE, objective_loss, objective_scores, objective_subnetworks


def dense_scores(d: l3d.Decomposition, data, retain, objective, damping: float) -> torch.Tensor:
    """s_k = g^T B (B^T H B + eps I)^-1 B^T g with dense float64 objects over every decomposed
    entry: g the objective's gradient, H = mean_rows J^T (d^2 D/dy^2) J the retain distance's
    Gauss-Newton matrix, B an orthonormal basis of span{L_kr (x) M_ks} per tensor (subnetwork
    k's core subspace)."""
    names, shapes = d.names, d.target.shapes
    sizes = [d.target.w0[n].numel() for n in names]
    model = copy.deepcopy(d.model).double()
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    flat0 = torch.cat([d.target.w0[n].double().flatten() for n in names])

    def f(flat: torch.Tensor, inputs) -> torch.Tensor:
        parts = dict(zip(names, flat.split(sizes)))
        params = {**frozen, **{n: parts[n].reshape(shapes[n]) for n in names}}
        if isinstance(inputs, dict):
            return functional_call(model, params, (), dict(inputs))
        return functional_call(model, params, (inputs.double(),))

    inputs, labels = data
    labels = labels.double() if labels.is_floating_point() else labels
    g = jacobian(lambda w: objective_loss(objective, f(w, inputs), labels), flat0)
    rows = SampleRows.of(retain, d.config.per_token)
    base = rows.rows(f(flat0, retain)).flatten(1).detach()
    jac = jacobian(lambda w: rows.rows(f(w, retain)).flatten(1), flat0)  # (n_rows, n_out, P)
    h = sum(
        jac[r].T @ hessian(lambda y, b=base[r]: d.divergence.distance_fn(y, b), base[r]) @ jac[r]
        for r in range(len(base))
    ) / len(base)
    bases = []
    for k in range(d.subnetworks.v_out.n_subnetworks):
        columns = []
        for t, factors in enumerate(d.subnetworks.v_out.factors):
            if len(factors.work_shape) == 1:
                left, right = factors.modes[0][k], torch.ones(1, 1)
            else:
                left, right = (m[k] for m in factors.split(0))
            for a in left.detach().double():
                for b in right.detach().double():
                    vec = torch.zeros(len(flat0), dtype=torch.float64)
                    offset = sum(sizes[:t])
                    vec[offset : offset + sizes[t]] = torch.outer(a, b).flatten()
                    columns.append(vec)
        bases.append(torch.linalg.qr(torch.stack(columns, 1)).Q)
    eps = damping * sum(torch.trace(b.T @ h @ b) for b in bases) / sum(b.shape[1] for b in bases)
    return torch.stack(
        [
            (b.T @ g) @ torch.linalg.solve(b.T @ h @ b + eps * torch.eye(b.shape[1]), b.T @ g)
            for b in bases
        ]
    )


def test_scores_equal_dense_oracle_mlp_mse():
    torch.manual_seed(0)
    model = SmallMLP()
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    d = l3d.decompose(
        model,
        x,
        params=["fc1.weight", "fc1.bias", "fc2.weight"],
        n_subnetworks=4,
        rank=2,
        epochs=3,
        batch_size=16,
        progress=False,
    )
    with torch.no_grad():
        labels = model(x[:10]).clone()
    labels[:, 0] += 1.0
    data, retain = (x[:10], labels), x[10:]
    scores = objective_scores(d, data, retain, objective="labels", damping=0.01, chunk=7)
    want = dense_scores(d, data, retain, "labels", 0.01)
    torch.testing.assert_close(scores.double(), want, rtol=2e-3, atol=1e-7)
    assert objective_subnetworks(d, data, retain, 2, objective="labels", damping=0.01) == [
        int(k) for k in want.argsort(descending=True)[:2]
    ]


def test_scores_equal_dense_oracle_per_token_kl():
    torch.manual_seed(0)
    model = TinyTokenModel()
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 7, (16, 6), generator=generator)
    mask = torch.ones(16, 6, dtype=torch.long)
    mask[::3, 4:] = 0  # padding: no retain samples there
    data = {"input_ids": ids, "attention_mask": mask}
    d = l3d.decompose(
        model,
        data,
        params=["mix.weight", "head.weight", "head.bias"],
        n_subnetworks=3,
        rank=2,
        epochs=3,
        batch_size=8,
        divergence="kl",
        per_token=True,
        progress=False,
    )
    target = {k: v[:5] for k, v in data.items()}
    retain = {k: v[5:] for k, v in data.items()}
    labels = torch.full((5, 6), IGNORE)
    labels[:, 2:4] = ids[:5, 3:5]  # forget two answer positions per sequence
    scores = objective_scores(d, (target, labels), retain, objective="forget", chunk=4)
    want = dense_scores(d, (target, labels), retain, "forget", 1e-3)
    torch.testing.assert_close(scores.double(), want, rtol=2e-3, atol=1e-7)


class Planted(nn.Module):
    """Output 0 reads hidden unit 0 (tanh x_0) and unit 1 (tanh x_1); the retain inputs have
    x_0 = 0, so writing through unit 0 cannot move them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 3, bias=False)
        self.fc2 = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(3))
            self.fc2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.5, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_selection_finds_the_subnetwork_silent_on_the_retain_data():
    model = Planted()
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(32, 3, generator=generator).abs() * torch.tensor([0.5, 2.0, 1.0])
    retain = torch.randn(32, 3, generator=generator)
    d = l3d.decompose(model, retain, params=["fc2.weight"], n_subnetworks=3, epochs=1,
                      progress=False)  # fmt: skip
    # Rank-1 subnetworks of fc2: write output 0 from unit 0, output 0 from unit 1, output 1
    # from unit 2. Raising output 0 has the larger gradient through unit 1 (x_1 is larger on
    # the target); the retain data decide which of the two leaves them alone.
    directions = Subnetworks({"fc2.weight": (2, 3)}, 3, {"fc2.weight": 1})
    with torch.no_grad():
        out_mode, in_mode = directions.factors[0].modes
        out_mode.copy_(torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]]))
        in_mode.copy_(torch.eye(3)[:, None, :])
        labels = model(target) + torch.tensor([1.0, 0.0])

    def scores(silent: int, damping: float = 1e-3) -> torch.Tensor:
        kept = retain.clone()
        kept[:, silent] = 0.0
        return objective_scores(d, (target, labels), kept, objective="labels", damping=damping,
                                directions=directions)  # fmt: skip

    assert scores(0).argmax() == 0
    assert scores(1).argmax() == 1
    assert scores(0, damping=1e6).argmax() == 1  # the retain curvature ignored: gradient alone
    assert scores(0)[2] == pytest.approx(0.0, abs=1e-12)  # output 1 is not in the objective


def test_bad_input_gets_one_line_errors():
    torch.manual_seed(0)
    model = SmallMLP()
    x = torch.randn(16, 4)
    d = l3d.decompose(model, x, params=["fc2.weight"], n_subnetworks=2, epochs=1, progress=False)
    labels = torch.zeros(16, dtype=torch.long)
    for kwargs, message in [
        ({"damping": 0.0}, "damping must be > 0"),
        ({"chunk": 0}, "chunk >= 1"),
        ({"objective": "nope"}, "unknown objective"),
    ]:
        with pytest.raises(L3DError, match=message) as err:
            objective_scores(d, (x, labels), x, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(L3DError, match=r"n must be an int in 1\.\.2"):
        objective_subnetworks(d, (x, labels), x, 3)
    with pytest.raises(L3DError, match="do not fit"):
        objective_scores(d, (x, torch.zeros(16, 2, 2, dtype=torch.long)), x)
