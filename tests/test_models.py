"""Models and data unlike the toys, as a researcher might pass them to `l3d.decompose`: each is
either decomposed exactly (checked against a per-sample autograd loop) or refused in one line."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import l3d
from l3d import L3DError
from test_gradients import assert_every_backend_equals_the_loop

RUN = {"n_subnetworks": 2, "epochs": 1, "progress": False}


class Wrap(nn.Module):
    """A linear layer whose output `post(y, x)` returns."""

    def __init__(self, post=lambda y, x: y, n_in: int = 4, n_out: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.post = post

    def forward(self, x):
        return self.post(self.fc(x), x)


@pytest.mark.parametrize("method", ["auto", "vmap", "structured"])
def test_a_model_drawing_random_numbers_in_forward_is_refused(method):
    """Dropout called with training=True (or noise added) in forward: vmap raised its
    randomness traceback, the structured path decomposed noise silently."""
    torch.manual_seed(0)  # the check compares 3 forwards of 6 numbers: same masks 1 in 4096
    model = Wrap(lambda y, x: nn.functional.dropout(y, 0.5, training=True))
    with pytest.raises(L3DError, match=r"outputs differ between two runs .* draws random"):
        l3d.decompose(
            model, torch.randn(64, 4), params=["fc.weight"], gradient_method=method, **RUN
        )


@pytest.mark.parametrize(
    ("post", "said"),
    [
        (lambda y, x: y[:, 0], r"one number per sample, shaped \(2,\).*unsqueeze\(-1\)"),
        (lambda y, x: y.sum(), r"a single number.*one output row per sample"),
        (lambda y, x: y.mean(0, keepdim=True).expand(3, -1), r"3 output rows for 2 inputs"),
    ],
)
def test_outputs_without_one_row_per_sample_are_refused(post, said):
    """(n,) outputs, a 0-d output and outputs whose rows are not the samples gave IndexError
    tracebacks deep in the references or resampling."""
    with pytest.raises(L3DError, match=said):
        l3d.decompose(Wrap(post), torch.randn(64, 4), params=["fc.weight"], **RUN)


def test_an_output_object_without_logits_is_refused():
    class Out:
        logits = None

    with pytest.raises(L3DError, match="returned Out"):
        l3d.decompose(Wrap(lambda y, x: Out()), torch.randn(64, 4), params=["fc.weight"], **RUN)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.index = nn.Parameter(torch.arange(3), requires_grad=False)

    def forward(self, x):
        return self.scale * self.fc(x)[:, self.index]


@pytest.mark.parametrize(
    ("params", "said"),
    [
        (["scale"], r"'scale' is a single number \(0-d\).*leave it out of params"),
        (["*"], r"'scale' is a single number \(0-d\)"),
        (["index"], r"'index' holds int64 values, which have no gradient"),
    ],
)
def test_parameters_without_an_axis_or_a_gradient_are_refused(params, said):
    with pytest.raises(L3DError, match=said):
        l3d.decompose(Scaled(), torch.randn(64, 4), params=params, **RUN)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = Wrap()
    with pytest.raises(L3DError, match="meta device.*load its weights"):
        l3d.decompose(model, torch.randn(64, 4), params=["fc.weight"], **RUN)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ({"x": torch.randn(64, 4), "y": torch.randn(10, 1)}, r"64 and 10 rows.*one row per sample"),
        ({}, r"the data dict is empty"),
        ((torch.randn(64, 4), torch.randint(0, 3, (64,))), r"a tuple of 2 tensors.*list"),
        ([torch.randn(32, 4), torch.randn(32, 5)], r"model fails on the data's first samples"),
    ],
)
def test_data_that_cannot_be_batches_of_samples_is_refused(data, said):
    """Dict entries of different lengths (IndexError), an empty dict (StopIteration), an
    (inputs, labels) tuple (read as two batches: labels decomposed as inputs, or a dtype
    traceback), a later batch of another width (a shape traceback mid-training)."""

    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, y=None):
            return self.fc(x)

    model = DictModel()
    with pytest.raises(L3DError, match=said):
        l3d.decompose(model, data, params=["fc.weight"], **RUN)


def test_a_layer_called_by_keyword_gets_exact_gradients():
    """`self.fc(input=x)`: the structured path's hook read args[0] (IndexError). Compared as
    per-sample gradients: two trainings' coefficients drift apart with Adam's round-off."""
    torch.manual_seed(0)
    assert_every_backend_equals_the_loop(
        KeywordCall(), torch.randn(16, 4), ["fc.weight"], ("structured",)
    )


class KeywordCall(Wrap):
    def forward(self, x):
        return self.fc(input=x)


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(input_ids).cumsum(1)))


def test_a_batch_without_samples_is_skipped():
    """Per-token runs whose batches can hold no sample (sequences all padding, or pair positions
    on some sequences only): batch top-k of no coefficients crashed ('selected index k out of
    range') whenever the shuffle put only such sequences in one batch."""
    ids = torch.randint(0, 7, (8, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 5, dtype=torch.long)
    mask[:2] = 1  # six of eight sequences are padding only
    data = {"input_ids": ids, "attention_mask": mask}
    d = l3d.decompose(
        TokenModel(), data, params=["head.weight"], per_token=True, divergence="kl",
        batch_size=2, n_subnetworks=2, epochs=3, progress=False,
    )  # fmt: skip
    assert d.evaluation.n_samples == 10
    assert len(d.history) == 3


@pytest.mark.parametrize("settings", ["l3d", "paper"])
def test_zero_gradients_are_named_as_such(settings):
    """Params the output does not depend on, or KL over one output (always 0): the paper's
    settings trained to a loss of 0 (a 'perfect' decomposition of nothing); the library's said
    to give n_subnetworks, then to use init='random' or more data, which led there."""
    model = Wrap()
    model.unused = nn.Linear(4, 3)
    x = torch.randn(64, 4)
    with pytest.raises(L3DError, match="every per-sample gradient zero.*not depend on"):
        l3d.decompose(
            model, x, params=["unused.weight"], settings=settings, epochs=1, progress=False
        )
    one = Wrap(n_out=1)
    with pytest.raises(L3DError, match="every per-sample gradient zero.*single output"):
        l3d.decompose(
            one, x, params=["fc.weight"], divergence="kl", settings=settings, n_subnetworks=2,
            epochs=1, progress=False,
        )  # fmt: skip


def test_non_finite_outputs_are_named_as_such_not_as_randomness():
    """NaN outputs differ from themselves: the determinism check must not call them random."""
    model = Wrap(lambda y, x: torch.where(x[:, :1] > 0, y, y * float("nan")))
    x = torch.randn(64, 4)
    x[:2, 0] = -1
    with pytest.raises(L3DError, match="NaN") as err:
        l3d.decompose(model, x, params=["fc.weight"], **RUN)
    assert "random" not in str(err.value)


def test_a_forward_branching_on_values_runs_one_sample_at_a_time(caplog):
    """vmap cannot run a forward that branches on tensor values or calls .item(): it was an
    error (torch's long RuntimeError before that). Run one sample at a time, each sample takes
    its own branch, as a loop of backward calls does."""
    model = Wrap(lambda y, x: y * 0 if torch.isnan(x).any() else y)  # a guard, as models have
    with caplog.at_level(logging.WARNING, logger="l3d"):
        assert_every_backend_equals_the_loop(
            model, torch.randn(8, 4), ["fc.weight"], methods=("vmap", "auto")
        )
    assert any("one sample at a time" in r.getMessage() for r in caplog.records)


def test_an_hf_model_with_sdpa_attention_runs_and_is_told_to_use_eager(caplog):
    """transformers' sdpa attention calls .item() for its causal mask, which vmap cannot run:
    it was an error naming attn_implementation='eager'. The tensors vmap runs for now take one
    sample at a time, and the warning still names the faster way."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.randint(2, 10, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with caplog.at_level(logging.WARNING, logger="l3d"):
        l3d.decompose(
            model.eval(), {"input_ids": ids, "attention_mask": mask},
            params=["model.norm.weight"], per_token=True, divergence="kl",
            gradient_method="vmap", **RUN,
        )  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "one sample at a time" in r.getMessage()]
    assert said and "attn_implementation='eager'" in said[0]
