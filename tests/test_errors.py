"""Bad input gets one clear L3DError naming the problem and the fix, never a deep stack trace."""

from __future__ import annotations

import pytest
import torch

import l3d
from l3d import L3DError


def run(model, data, **kw):
    args = dict(params=["fc1.weight"], n_subnetworks=3, epochs=1, progress=False)
    return l3d.decompose(model, data, **{**args, **kw})


def test_unknown_params_lists_close_matches(mlp):
    with pytest.raises(
        L3DError, match=r"'fc1.wieght' matches no parameter.*Close matches: fc1.weight"
    ):
        run(mlp, torch.randn(8, 4), params=["fc1.wieght"])
    with pytest.raises(L3DError, match="layers.*matches no parameter.*fc2.bias"):
        run(mlp, torch.randn(8, 4), params=["layers.*.weight"])


def test_empty_params(mlp):
    with pytest.raises(L3DError, match="no parameter tensors given"):
        run(mlp, torch.randn(8, 4), params=[])


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5])
def test_top_k_outside_unit_interval(mlp, k):
    with pytest.raises(L3DError, match=r"top_k.*must be in \(0, 1\]"):
        run(mlp, torch.randn(8, 4), top_k=k)


def test_n_subnetworks_and_rank_below_one(mlp):
    with pytest.raises(L3DError, match="n_subnetworks.*greater than or equal to 1"):
        run(mlp, torch.randn(8, 4), n_subnetworks=0)
    with pytest.raises(L3DError, match="rank.*must be >= 1"):
        run(mlp, torch.randn(8, 4), rank=0)
    with pytest.raises(L3DError, match="rank.*must be >= 1"):
        run(mlp, torch.randn(8, 4), rank={"*": 0})
    with pytest.raises(L3DError, match="gives no rank for tensor 'fc1.weight'"):
        run(mlp, torch.randn(8, 4), rank={"fc2.*": 2})


def test_sequence_chunks_without_per_token_point_to_chunk_size(mlp):
    with pytest.raises(L3DError, match="without per_token set chunk_size instead"):
        run(mlp, torch.randn(8, 4), sequence_chunk_size=2)


@pytest.mark.parametrize("precision", ["low", "bf16"])
def test_unknown_matmul_precision_lists_the_choices(mlp, precision):
    with pytest.raises(L3DError, match="matmul_precision.*'highest', 'high' or 'medium'"):
        run(mlp, torch.randn(8, 4), matmul_precision=precision)


@pytest.mark.parametrize(
    "data,said",
    [
        (
            torch.randn(8, 5),
            r"\(tensor float32 \(2, 5\)\): mat1 and mat2 shapes cannot be multiplied",
        ),
        (torch.randint(0, 3, (8, 4)), r"\(tensor int64 \(2, 4\)\): .*dtype"),
    ],
)
def test_data_that_does_not_fit_the_model_names_the_inputs(mlp, data, said):
    with pytest.raises(L3DError, match=said + r".*matches the model's input"):
        run(mlp, data)
    trained = run(mlp, torch.randn(8, 4))
    with pytest.raises(L3DError, match="the model fails on the data's first samples"):
        trained.coefficients(data)


def test_unknown_option_names_the_close_key(mlp):
    with pytest.raises(L3DError, match="unknown config key 'warmstart_epochs'.*warm_start_epochs"):
        run(mlp, torch.randn(8, 4), warmstart_epochs=3)


def test_fewer_than_two_samples(mlp):
    with pytest.raises(L3DError, match="at least 2 samples"):
        run(mlp, torch.randn(1, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data(mlp, bad):
    x = torch.randn(8, 4)
    x[3, 1] = bad
    with pytest.raises(L3DError, match="NaN/inf"):
        run(mlp, x)


def test_non_finite_gradients_name_the_tensor(mlp):
    def sqrt_divergence(output, reference):  # d sqrt(x)/dx at x = 0 is inf, times 0: NaN
        return (0 * (output - reference)).sqrt().sum()

    with pytest.raises(L3DError, match="fc1.weight.*NaN/inf"):
        run(mlp, torch.randn(8, 4), divergence=sqrt_divergence, gradient_method="vmap")


def test_divergence_with_wrong_shape(mlp):
    with pytest.raises(L3DError, match=r"must return a scalar.*returned \(3,\)"):
        run(mlp, torch.randn(8, 4), divergence=lambda out, ref: (out - ref) ** 2)


def test_unknown_divergence_and_reference(mlp):
    with pytest.raises(L3DError, match="unknown divergence 'kld'"):
        run(mlp, torch.randn(8, 4), divergence="kld")
    with pytest.raises(L3DError, match="unknown reference 'median'"):
        run(mlp, torch.randn(8, 4), reference="median")


def test_one_shot_iterator_is_refused(mlp):
    with pytest.raises(L3DError, match="one-shot iterator"):
        run(mlp, iter([torch.randn(8, 4)]))


def test_per_token_needs_a_sequence_axis(mlp):
    with pytest.raises(
        L3DError, match=r"per_token=True needs outputs shaped \(batch, seq, vocab\)"
    ):
        run(mlp, torch.randn(8, 4), per_token=True)


def test_custom_callables_are_recorded_and_required(mlp):
    def my_divergence(out, ref):
        return (out - ref).abs().mean()

    d = run(mlp, torch.randn(8, 4), divergence=my_divergence)
    assert d.config.divergence == "custom:my_divergence"
    with pytest.raises(L3DError, match="pass the callable"):
        l3d.run(mlp, torch.randn(8, 4), d.config, progress=False)


def test_iterable_of_batches_with_labels_is_accepted(mlp):
    batches = [(torch.randn(8, 4), torch.zeros(8)) for _ in range(3)]
    d = run(mlp, batches, epochs=2)
    assert d.evaluation.n_samples == 24


def test_model_returning_a_dict_is_not_blamed_on_the_data():
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc1(x)}

    with pytest.raises(L3DError, match="the model returned dict") as err:
        run(DictModel(), torch.randn(8, 4))
    assert "matches the model's input" not in str(err.value)


@pytest.mark.parametrize("k", [3, -1, 1.0])
def test_subnetwork_index_out_of_range(mlp, k):
    trained = run(mlp, torch.randn(8, 4))
    for ask in (
        trained.v_out,
        trained.v_in,
        lambda k: trained.intervene(torch.randn(2, 4), k, 0.1),
    ):
        with pytest.raises(L3DError, match=rf"subnetwork index {k!r} out of range.*0\.\.2"):
            ask(k)
