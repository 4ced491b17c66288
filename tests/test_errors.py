"""Bad input gets one clear L3DError naming the problem and the fix, never a deep stack trace."""

from __future__ import annotations

import re

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
    with pytest.raises(L3DError, match="n_subnetworks.*whole number >= 1 or 'auto'.*got 0$"):
        run(mlp, torch.randn(8, 4), n_subnetworks=0)
    with pytest.raises(L3DError, match="n_subnetworks.*got '5'; write numbers without quotes"):
        run(mlp, torch.randn(8, 4), n_subnetworks="5")
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


@pytest.mark.parametrize(
    ("k", "message"),
    [(3, "3 out of range"), (-1, "-1 out of range"), (1.0, "1.0 is not an integer")],
)
def test_subnetwork_index_out_of_range(mlp, k, message):
    trained = run(mlp, torch.randn(8, 4))
    for ask in (
        trained.v_out,
        trained.v_in,
        lambda k: trained.intervene(torch.randn(2, 4), k, 0.1),
    ):
        with pytest.raises(L3DError, match=rf"subnetwork index {message}.*0\.\.2"):
            ask(k)


def test_numpy_and_torch_integers_index_subnetworks(mlp):
    """An argsort's entries were refused as 'out of range' by v_out, v_in and intervene, while
    finetuning took them: both now read subnetwork indices with one helper."""
    import numpy as np

    trained = run(mlp, torch.randn(8, 4))
    x = torch.randn(2, 4)
    for k in (np.int64(1), torch.tensor(1), torch.argsort(torch.tensor([2.0, 0.0, 1.0]))[0]):
        for ask in (trained.v_out, trained.v_in):
            for name, tensor in ask(k).items():
                torch.testing.assert_close(tensor, ask(1)[name], rtol=0, atol=0)
        torch.testing.assert_close(trained.intervene(x, k, 0.3), trained.intervene(x, 1, 0.3))
    with pytest.raises(L3DError, match="subnetwork index True is not an integer"):
        trained.v_out(True)


@pytest.mark.parametrize("delta", [float("nan"), float("inf"), "0.5", None])
def test_intervention_delta_must_be_a_finite_number(mlp, delta):
    # NaN or inf along a subnetwork gave NaN outputs silently; a string failed deep in torch.
    trained = run(mlp, torch.randn(8, 4))
    for ask in (
        lambda: trained.intervene(torch.randn(2, 4), 0, delta),
        lambda: trained.output_change(torch.randn(2, 4), 0, [0.5, delta]),
        lambda: trained.perturbed(0, delta).__enter__(),
    ):
        with pytest.raises(L3DError, match=r"delta must be a finite number.*got") as err:
            ask()
        one_line(err)


def test_intervention_on_tensors_not_decomposed_is_refused(mlp):
    # Unknown names were skipped, so the "intervened" outputs were the model's own.
    trained = run(mlp, torch.randn(8, 4))
    with pytest.raises(L3DError, match=r"'fc2.weight' .*not decomposed.*fc1.weight") as err:
        trained.intervene(torch.randn(2, 4), 0, 0.5, params=["fc2.weight"])
    one_line(err)
    x = torch.randn(2, 4)
    assert torch.equal(
        trained.intervene(x, 0, 0.5, params=["fc1.weight"]), trained.intervene(x, 0, 0.5)
    )


def test_output_change_needs_a_delta(mlp):
    trained = run(mlp, torch.randn(8, 4))
    with pytest.raises(L3DError, match=r"no deltas given.*e\.g\. \[0\.5, 1\.0\]") as err:
        trained.output_change(torch.randn(2, 4), 0, [])
    one_line(err)


def test_every_call_checks_its_inputs_not_only_the_first(mlp):
    # The gradient source was checked on the first inputs asked about only: a later impact or
    # contrast selection on data of another width failed with torch's traceback.
    trained = run(mlp, torch.randn(8, 4))
    trained.impact(torch.randn(4, 4))
    for ask in (trained.impact, trained.coefficients):
        with pytest.raises(L3DError, match=r"model fails on the data's first samples") as err:
            ask(torch.randn(4, 3))
        one_line(err)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# Token models without per_token (issue 12, item 1) ----------------------------------------------


def test_token_model_without_per_token_is_refused(token_model):
    ids = torch.randint(0, 7, (8, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 3:] = 0
    for data in (ids, {"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}):
        with pytest.raises(L3DError, match=r"\(2, 5, 7\).*sequence axis.*per_token=True") as err:
            run(token_model, data, params=["mix.weight"], divergence="kl")
        one_line(err)
    # With per_token the same data runs, and padding is no sample.
    d = run(token_model, {"input_ids": ids, "attention_mask": mask}, params=["mix.weight"],
            divergence="kl", per_token=True)  # fmt: skip
    assert d.evaluation.n_samples == int(mask.sum())


def test_one_sequence_is_per_token_samples_enough(token_model):
    """A single sequence holds many per-token samples: its coefficients and impacts are those
    of the same sequence in a larger batch (explicit references, so none are drawn), not an
    IndexError from checking the first two sequences."""
    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(1))
    d = run(token_model, ids, params=["mix.weight"], divergence="kl", per_token=True)
    references = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(2))
    one = d.coefficients(ids[:1], references[:1])  # the first call builds the gradient source
    torch.testing.assert_close(one, d.coefficients(ids, references)[:5])
    assert d.impact(ids[:1]).shape == (5, 3)


def test_float_sequences_without_per_token_still_run():
    """Only token inputs are refused: a float model with a (batch, seq, d) output keeps its
    one-sample-per-input meaning."""
    model = torch.nn.Linear(4, 3)
    x = torch.randn(8, 2, 4)
    d = l3d.decompose(model, x, params=["weight"], n_subnetworks=2, epochs=1, progress=False)
    assert d.evaluation.n_samples == 8


# Precision (item 6) -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_non_float32_model_is_refused_in_one_line(mlp, dtype):
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        L3DError, match=rf"model parameters are {name}: L3D computes in float32; call model.float"
    ) as err:
        run(mlp.to(dtype), torch.randn(8, 4).to(dtype))
    one_line(err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_data_is_refused_in_one_line(mlp, dtype):
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(L3DError, match=rf"data is {name}: L3D computes in float32.*\.float\(\)"):
        run(mlp, torch.randn(8, 4).to(dtype))


# Memory (item 7) --------------------------------------------------------------------------------


def test_too_many_subnetworks_are_refused_before_allocating():
    model = torch.nn.Linear(2000, 2000)
    with pytest.raises(
        L3DError, match=r"n_subnetworks=1000000 .*needs about 1280 GB.*reduce n_subnetworks"
    ) as err:
        l3d.decompose(
            model, torch.randn(8, 2000), params=["weight"], n_subnetworks=10**6, rank=10,
            epochs=1, progress=False,
        )  # fmt: skip
    one_line(err)


def test_memory_estimate_is_checked_against_the_device(mlp, monkeypatch):
    from l3d.core import algorithm

    monkeypatch.setattr(algorithm, "device_memory", lambda device: 10_000)
    with pytest.raises(L3DError, match=r"more than the 10 kB of memory of cpu"):
        run(mlp, torch.randn(8, 4), n_subnetworks=200)
    run(mlp, torch.randn(8, 4), n_subnetworks=3)  # 4 x 2 x 3 x (4 + 6) floats: fits


# Warm start (item 8) ------------------------------------------------------------------------------


@pytest.mark.parametrize("warm,epochs", [(5, 2), (2, 2), (1, 1)])
def test_warm_start_must_end_before_the_last_epoch(mlp, warm, epochs):
    with pytest.raises(
        L3DError, match=rf"warm_start_epochs={warm} .*epochs={epochs}.*never .*top_k"
    ) as err:
        run(mlp, torch.randn(8, 4), epochs=epochs, warm_start_epochs=warm)
    one_line(err)


def test_presets_fit_their_warm_start_to_the_epochs(mlp):
    from l3d import hf, vision

    lm = hf.get_preset("tinystories-8m")
    assert lm.config().warm_start_epochs == 10  # the paper's run: 10 of 100 epochs
    assert lm.config(epochs=2).warm_start_epochs == 0
    assert lm.config(epochs=50).warm_start_epochs == 5
    assert lm.config(epochs=5, warm_start_epochs=3).warm_start_epochs == 3  # an explicit choice
    with pytest.raises(L3DError, match="warm_start_epochs=3"):
        lm.config(epochs=2, warm_start_epochs=3)
    cnn = vision.get_preset("mobilenet-v3-small")
    assert cnn.config(mlp, params=["fc1.*"], epochs=2).warm_start_epochs == 0
    assert cnn.config(mlp, params=["fc1.*"], epochs=30).warm_start_epochs == 3


# Strict types (item 11) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_subnetworks", "5"),
        ("n_subnetworks", 5.0),
        ("n_subnetworks", True),
        ("per_token", "no"),
        ("per_token", 0),
        ("epochs", "10"),
        ("lr", "0.01"),
        ("lr", True),
        ("top_k", "0.1"),
        ("seed", 1.0),
        ("rank", "2"),
        ("rank", {"*": "2"}),
        ("params", "fc1.weight"),
        ("params", [1]),
        ("device", 0),
        ("chunk_size", "8"),
        ("divergence", 1),
    ],
)
def test_wrong_types_are_errors_not_coerced(field, value):
    fields = {"params": ["fc1.weight"], "n_subnetworks": 3, field: value}
    with pytest.raises(L3DError) as err:
        l3d.L3DConfig.create(**fields)
    message = one_line(err)
    assert re.match(rf"config key '{field}[.']", message), message
    assert repr(value) in message or repr(value)[1:-1] in message, message


def test_right_types_are_accepted():
    config = l3d.L3DConfig.create(
        params=["fc1.weight", "fc2.*"], n_subnetworks=3, rank={"fc1.*": 2, "*": 1}, lr=1,
        weight_decay=0, top_k=1,
    )  # fmt: skip
    assert config.params == ("fc1.weight", "fc2.*") and config.lr == 1.0
    text = "params: [fc1.weight]\nn_subnetworks: 3\nlr: 1e-3\nper_token: true\nrank: {'*': 2}\n"
    from_yaml = l3d.L3DConfig.from_yaml(text)
    # YAML 1.1 reads 1e-3 (no dot) as a string; it is the one string taken as a number.
    assert from_yaml.lr == 0.001 and from_yaml.per_token is True
    assert l3d.L3DConfig.from_yaml(from_yaml.to_yaml()) == from_yaml
    with pytest.raises(L3DError, match=r"config key 'n_subnetworks'.*got '5'.*without quotes"):
        l3d.L3DConfig.from_yaml("params: [a]\nn_subnetworks: '5'\n")
    # A switch written 1 or 0 is refused (strict booleans), with what to write instead.
    with pytest.raises(L3DError, match=r"config key 'per_token'.*got 1\): write true or false"):
        l3d.L3DConfig.from_yaml("params: [a]\nper_token: 1\n")


# Custom callables at load time (item 13) --------------------------------------------------------


def test_loading_a_custom_divergence_says_to_pass_it_to_load(mlp, tmp_path):
    def my_divergence(out, ref):
        return (out - ref).abs().mean()

    def my_reference(outputs, generator):
        return outputs.flip(0)

    x = torch.randn(8, 4)
    run(mlp, x, divergence=my_divergence).save(tmp_path / "d")
    with pytest.raises(
        L3DError, match=r"custom:my_divergence.*l3d\.load\(.*divergence=my_divergence\)"
    ) as err:
        l3d.load(tmp_path / "d", mlp)
    one_line(err)
    loaded = l3d.load(tmp_path / "d", mlp, divergence=my_divergence)
    assert loaded.coefficients(x).shape == (8, 3)
    run(mlp, x, reference=my_reference).save(tmp_path / "r")
    with pytest.raises(L3DError, match=r"custom:my_reference.*l3d\.load\(.*reference=my_reference"):
        l3d.load(tmp_path / "r", mlp)
    assert l3d.load(tmp_path / "r", mlp, reference=my_reference).coefficients(x).shape == (8, 3)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**20])
def test_a_seed_beyond_64_bits_is_refused_by_the_config_and_the_experiments(seed):
    """torch.Generator.manual_seed takes 64 bits; beyond them a run failed at its first seeded
    draw with `Overflow when unpacking long long`."""
    from l3d.config import L3DConfig
    from l3d.experiments.runner import parse_seeds

    with pytest.raises(L3DError, match=r"seed.*64 bits"):
        L3DConfig.create(params=["fc1.weight"], n_subnetworks=2, seed=seed)
    with pytest.raises(L3DError, match=rf"--seeds: {seed} does not fit in 64 bits"):
        parse_seeds(f"0,{seed}")
    L3DConfig.create(params=["fc1.weight"], n_subnetworks=2, seed=2**63 - 1)


def test_a_diverging_run_stops_at_the_first_non_finite_epoch():
    """lr 1000 trained to NaN losses and returned as if done (`l3d decompose` exited 0); every
    reader then refused the saved decomposition as damaged."""
    from l3d.toys import TMS, sparse_features

    x = sparse_features(128, 5, p_active=0.1, generator=torch.Generator().manual_seed(1))
    seen = []
    with pytest.raises(L3DError) as err:
        l3d.decompose(
            TMS(),
            x,
            params=["W_in", "W_out", "b"],
            n_subnetworks=3,
            lr=1000.0,
            epochs=5,
            progress=False,
            callback=lambda trainer, record: seen.append(record),
        )
    message = str(err.value)
    assert "\n" not in message and "not finite" in message and "lower lr" in message
    assert f"epoch {len(seen)}" in message  # the epochs before it finished; none after
    assert all(torch.isfinite(torch.tensor(r["loss_paper"])) for r in seen)


@pytest.mark.parametrize("top_k", [2.0, 0.0, float("nan"), -0.5])
def test_evaluate_checks_top_k_as_the_config_does(mlp, top_k):
    """top_k 2.0 was accepted, 0 silently meant the default, NaN was a ValueError traceback."""
    trained = run(mlp, torch.randn(8, 4))
    with pytest.raises(L3DError, match=r"top_k.*\(0, 1\]") as err:
        trained.evaluate(torch.randn(8, 4), top_k=top_k)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("n", [1.5, 0, True, "3"])
def test_impact_checks_n_references(mlp, n):
    """n_references=1.5 ended in a TypeError traceback from range()."""
    trained = run(mlp, torch.randn(8, 4))
    with pytest.raises(L3DError, match="n_references must be an int >= 1"):
        trained.impact(torch.randn(8, 4), n_references=n)


# Models whose per-sample gradients the backends cannot form -------------------------------------


class BatchStatistics(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 5)
        self.norm = torch.nn.BatchNorm1d(5, track_running_stats=False)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


@pytest.mark.parametrize("method", ["auto", "structured", "vmap", "jacobian"])
@pytest.mark.parametrize("params", [["fc1.weight"], ["norm.weight"]])
def test_a_norm_using_batch_statistics_in_eval_mode_is_refused(method, params):
    """Without running statistics BatchNorm normalises over the batch even in eval mode: a
    sample's output depends on the others, so it has no per-sample gradient. The generic path
    ran each sample as a batch of one: `ValueError: Expected more than 1 value per channel`."""
    with pytest.raises(L3DError, match=r"'norm' \(BatchNorm1d\) normalises over the batch") as err:
        run(BatchStatistics(), torch.randn(8, 4), params=params, gradient_method=method)
    assert "track_running_stats=True" in one_line(err)


class Recurrent(torch.nn.Module):
    def __init__(self, cell: type[torch.nn.RNNBase], **embedding) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(9, 4, **embedding)
        self.rnn = cell(4, 5, batch_first=True)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0][:, -1])


def test_a_jacobian_cache_vmap_cannot_build_is_named_in_one_line():
    """nn.GRU has no vmap batching rule: a raw `RuntimeError: output with shape [1, 5] doesn't
    match the broadcast shape [8, 1, 5]`. The other paths run such a model one sample at a
    time (test_gradients.py); the Jacobian cache, asked for by name, says what runs instead."""
    ids = torch.randint(0, 9, (8, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        L3DError,
        match=r"vmap of jacrev \(the Jacobian cache\) cannot run the model per sample "
        r"for rnn\.weight_hh_l0",
    ) as err:
        run(Recurrent(torch.nn.GRU), ids, params=["rnn.weight_hh_l0"], gradient_method="jacobian")
    message = one_line(err)
    assert "in 'rnn' (GRU)" in message and "'vmap'" in message


def test_torch_func_errors_are_one_line_from_a_gradient_source_too():
    """The conversion was in the vmap backend only: a GradientSource on the Jacobian cache let
    torch.func's RuntimeError through."""
    from l3d.core.gradients import GradientSource
    from l3d.core.model import Target
    from l3d.core.samples import Dataset

    ids = torch.randint(0, 9, (8, 5), generator=torch.Generator().manual_seed(0))
    target = Target.create(Recurrent(torch.nn.GRU), ["rnn.weight_hh_l0"])
    source = GradientSource(
        target, "kl", "random", per_token=False, method="jacobian", dataset=Dataset(ids, 4),
        progress=False,
    )  # fmt: skip
    with pytest.raises(L3DError, match=r"in 'rnn' \(GRU\)") as err:
        next(source.epoch(torch.Generator()))
    one_line(err)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_an_embedding_with_max_norm_is_named_in_one_line(method):
    """nn.Embedding(max_norm=...) renormalises its weight in place in forward; the message
    blamed branching on tensor values or .item()."""
    ids = torch.randint(0, 9, (8, 5), generator=torch.Generator().manual_seed(0))
    model = Recurrent(torch.nn.LSTM, max_norm=1.0)
    with pytest.raises(
        L3DError, match=r"in 'embed' \(Embedding\).*max_norm=1\.0, which renormalises its weight"
    ) as err:
        run(model, ids, params=["embed.weight"], gradient_method=method)
    assert "max_norm = None" in one_line(err)


def test_intervene_reads_params_as_tensor_names(mlp):
    """params=[] returned the unmoved outputs as if intervened on; params='fc1.weight' was read
    letter by letter ("'f' was not decomposed")."""
    trained = run(mlp, torch.randn(8, 4), params=["fc1.weight", "fc2.weight"])
    x = torch.randn(3, 4)
    torch.testing.assert_close(
        trained.intervene(x, 0, 0.7, params="fc1.weight"),
        trained.intervene(x, 0, 0.7, params=["fc1.weight"]),
    )
    with pytest.raises(L3DError, match="params is empty") as err:
        trained.intervene(x, 0, 0.7, params=[])
    assert "\n" not in str(err.value)


def test_kl_on_outputs_with_several_axes_per_sample_is_refused():
    """(n, T, C) outputs with per_token=False: the 'mean' reference and output_change read each
    sample's T * C numbers as one distribution, the divergence as T distributions over C (the
    mean reference off by 0.25 in log-probability, output_change 0.18 where the divergence gave
    0.74); for (n, C, H, W) the softmax ran over W, not the classes."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    with pytest.raises(L3DError, match=r"shaped \(6, 4\).*per_token=True") as err:
        run(model, torch.randn(16, 6, 5), params=["0.weight"], divergence="kl")
    assert "\n" not in str(err.value)
    run(model, torch.randn(16, 6, 5), params=["0.weight"], divergence="mse")  # still fine
