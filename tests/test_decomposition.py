"""The Decomposition object: coefficients, interventions, P_act, save/load, config round trip."""

from __future__ import annotations

import copy

import pytest
import torch

import l3d
from l3d.core.divergences import kl


@pytest.fixture
def decomposition(mlp):
    return l3d.decompose(
        mlp,
        torch.randn(96, 4),
        params=["fc1.weight", "fc1.bias", "fc2.weight"],
        n_subnetworks=5,
        rank=2,
        divergence="kl",
        epochs=3,
        progress=False,
    )


def test_coefficients_equal_explicit_contraction(decomposition, mlp):
    x = torch.randn(6, 4)
    refs = mlp(x).detach().roll(1, 0)
    c = decomposition.coefficients(x, references=refs)
    assert c.shape == (6, 5)
    assert decomposition.gradient_source(x).method == "structured"  # nn.Linear: no dense grads
    for i in range(6):
        m = copy.deepcopy(mlp)
        kl(m(x[i : i + 1])[0], refs[i]).backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        for k in range(5):
            v = decomposition.v_in(k)
            expected = sum((v[n] * grads[n]).sum() for n in v)
            torch.testing.assert_close(c[i, k], expected, rtol=1e-4, atol=1e-6)


def test_default_references_are_seeded(decomposition):
    x = torch.randn(10, 4)
    torch.testing.assert_close(decomposition.coefficients(x), decomposition.coefficients(x))
    impact = decomposition.impact(x, n_references=3)
    assert impact.shape == (10, 5) and (impact >= 0).all()


def test_intervene_moves_weights_along_the_subnetwork(decomposition, mlp):
    x = torch.randn(4, 4)
    out = decomposition.intervene(x, 2, 0.5)
    moved = copy.deepcopy(mlp)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n in decomposition.names:
                p += 0.5 * decomposition.v_out(2)[n]
    torch.testing.assert_close(out, moved(x))
    torch.testing.assert_close(decomposition.intervene(x, 2, 0.0), mlp(x).detach())


def test_p_active_and_history(decomposition):
    p = decomposition.p_active
    assert p.shape == (5,) and ((p >= 0) & (p <= 1)).all()
    # on average each sample keeps k * n_v subnetworks (batch top-k)
    assert p.sum().item() == pytest.approx(0.1 * 5, rel=0.05)
    assert len(decomposition.history) == 3
    assert {"loss_paper", "loss_pooled_squared", "lr", "live_subnetworks"} <= set(
        decomposition.history[0]
    )


def test_save_load_round_trip(decomposition, mlp, tmp_path):
    decomposition.save(tmp_path / "run")
    loaded = l3d.load(tmp_path / "run", mlp)
    assert loaded.config == decomposition.config
    assert loaded.history == decomposition.history
    assert torch.equal(loaded.p_active, decomposition.p_active)
    for k in range(5):
        for n, t in decomposition.v_out(k).items():
            assert torch.equal(loaded.v_out(k)[n], t)
            assert torch.equal(loaded.v_in(k)[n], decomposition.v_in(k)[n])
    x = torch.randn(5, 4)
    assert torch.equal(loaded.coefficients(x), decomposition.coefficients(x))
    assert not list((tmp_path / "run").glob("*.tmp")), "atomic writes leave no temporaries"


def test_load_refuses_a_different_model(decomposition, tmp_path):
    from conftest import SmallMLP

    decomposition.save(tmp_path / "run")
    with pytest.raises(l3d.L3DError, match=r"fc1.weight' has shape \(8, 4\), saved \(6, 4\)"):
        l3d.load(tmp_path / "run", SmallMLP(n_hidden=8))
    with pytest.raises(l3d.L3DError, match="not a parameter of this model"):
        l3d.load(tmp_path / "run", torch.nn.Sequential(torch.nn.Linear(4, 3)))
    with pytest.raises(l3d.L3DError, match="missing"):
        l3d.load(tmp_path, SmallMLP())


def test_config_round_trips_through_yaml(decomposition, tmp_path):
    path = tmp_path / "c.yaml"
    decomposition.config.to_yaml(path)
    assert l3d.L3DConfig.from_yaml(path) == decomposition.config
    assert l3d.L3DConfig.from_yaml(path.read_text()) == decomposition.config


def test_tucker_factorization_runs_and_reports_ranks(mlp):
    d = l3d.decompose(
        mlp,
        torch.randn(32, 4),
        params=["fc1.weight", "fc2.bias"],
        n_subnetworks=3,
        rank={"fc1.*": 2, "*": 1},
        factorization="tucker",
        epochs=1,
        progress=False,
    )
    assert d.ranks == {"fc1.weight": 2, "fc2.bias": 1}
    assert d.v_out(0)["fc1.weight"].shape == (6, 4)


def test_output_change_is_clamped_at_zero(mlp):
    def signed(output, reference):  # a custom divergence whose distance can be negative
        return (output - reference).mean()

    x = torch.randn(32, 4)
    d = l3d.decompose(
        mlp, x, params=["fc1.weight"], n_subnetworks=2, epochs=1, divergence=signed,
        progress=False,
    )  # fmt: skip
    moved, base = d.intervene(x, 0, 0.5), d.intervene(x, 0, 0.0)
    assert ((moved - base).mean(1) < 0).any()  # the raw distance is negative somewhere
    change = d.output_change(x, 0, [0.5])
    assert (change >= 0).all()
    torch.testing.assert_close(change[0], (moved - base).mean(1).clamp(min=0))


@pytest.mark.parametrize(
    "loss, label", [("paper", "loss (eq. 8)="), ("pooled_squared", "pooled loss=")]
)
def test_training_bar_names_the_loss_it_shows(mlp, capsys, loss, label):
    l3d.decompose(
        mlp, torch.randn(32, 4), params=["fc1.weight"], n_subnetworks=2, epochs=2, loss=loss,
        progress=True,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert label in err and "2/2" in err
    assert "loss=" not in err.replace(label, "")


def test_held_out_loss_is_logged_every_epoch_and_never_trained_on(mlp):
    from l3d.config import L3DConfig
    from l3d.core.samples import split_held_out
    from l3d.decomposition import HELD_OUT_SEED_OFFSET, run

    x = torch.randn(80, 4, generator=torch.Generator().manual_seed(0))
    config = L3DConfig.create(
        params=["fc1.weight", "fc2.weight"], n_subnetworks=4, rank=1, epochs=3, batch_size=16,
        divergence="kl", heldout_fraction=0.25, seed=3,
    )  # fmt: skip
    trained_on = []
    d = run(mlp, x, config, progress=False, step_callback=lambda r: trained_on.append(r.n_samples))
    assert sum(trained_on) == 3 * 60  # 20 of the 80 inputs held out, every epoch
    assert all("loss_heldout_pooled_squared" in r for r in d.history)
    train, held = split_held_out(x, 0.25, torch.Generator().manual_seed(3 + HELD_OUT_SEED_OFFSET))
    assert len(held) == 20 and len(train) == 60
    assert not (held[:, None] == train[None]).all(-1).any()  # disjoint rows
    # Oracle: the last epoch's held-out loss is the final subnetworks evaluated on those rows.
    oracle = d.evaluate(held, seed=config.seed + 7)
    last = d.history[-1]
    assert last["loss_heldout_pooled_squared"] == pytest.approx(oracle.loss_pooled_squared, 1e-5)
    assert last["loss_heldout_paper"] == pytest.approx(oracle.loss_paper, 1e-5)


def test_held_out_split_needs_indexable_data_and_enough_of_it(mlp):
    x = torch.randn(8, 4)
    with pytest.raises(l3d.L3DError, match="one tensor or dict of tensors"):
        l3d.decompose(
            mlp, [x[:4], x[4:]], params=["fc1.weight"], n_subnetworks=2, epochs=1,
            heldout_fraction=0.25, progress=False,
        )  # fmt: skip
    with pytest.raises(l3d.L3DError, match="leaves 1 to train on"):
        l3d.decompose(
            mlp, x[:3], params=["fc1.weight"], n_subnetworks=2, epochs=1,
            heldout_fraction=0.4, progress=False,
        )  # fmt: skip


class NormDropNet(torch.nn.Module):
    """BatchNorm (fitted running statistics) and dropout, as a user's model left in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def test_a_model_in_train_mode_runs_in_eval_mode_and_keeps_its_state():
    """Samples must not interact (batch statistics), be random (dropout) or change the model
    (running statistics). The default subnetwork count ran a train-mode model in train mode (a
    vmap traceback after moving BatchNorm's statistics); interventions ran it in whatever mode
    it was in (at δ = 0 the outputs were not f(x, W0)); coefficients left it in eval mode."""
    torch.manual_seed(0)
    model = NormDropNet()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(64, 4)
    state = copy.deepcopy(model.state_dict())
    model.train()
    d = l3d.decompose(model, x, params=["fc1.weight", "fc2.weight"], epochs=2, progress=False)
    assert model.training and model.norm.training
    at_w0 = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(d.intervene(x, 0, 0.0), at_w0)
    torch.testing.assert_close(d.intervene(x, 0, 0.0), d.intervene(x, 0, 0.0), rtol=0, atol=0)
    assert d.output_change(x, 0, [0.0]).abs().max() == 0
    d.coefficients(x)
    d.output_derivative(x, 0)
    assert model.training and model.norm.training and model.drop.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    # A submodule the user left in eval mode stays so.
    model.drop.eval()
    d.intervene(x, 0, 0.1)
    assert model.training and not model.drop.training


def test_inputs_of_another_dtype_are_one_line_in_interventions():
    """coefficients refused them in one line; intervene, output_change and output_derivative
    raised torch's dtype mismatch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(32, 6)
    d = l3d.decompose(model, x, params=["0.weight"], n_subnetworks=2, epochs=1, progress=False)
    for dtype in (torch.float64, torch.bfloat16):
        for call in (
            lambda y: d.intervene(y, 0, 0.1),
            lambda y: d.output_change(y, 0, [0.1]),
            lambda y: d.output_derivative(y, 0),
        ):
            with pytest.raises(l3d.L3DError) as err:
                call(x.to(dtype))
            assert "\n" not in str(err.value)


def test_a_model_returning_float64_outputs_is_one_line():
    """A float32 model whose forward returns float64 died in the cached-Jacobian path."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(x).double()

    with pytest.raises(l3d.L3DError, match="float64 outputs"):
        l3d.decompose(Net(), torch.randn(32, 6), params=["fc.weight"], n_subnetworks=2,
                      epochs=1, progress=False)  # fmt: skip
