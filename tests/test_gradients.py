"""Per-sample divergence gradients equal a Python loop of backward() calls (eq. 2)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import l3d
from l3d.core.divergences import kl, mse, random_other
from l3d.core.gradients import GradientSource, per_sample_gradients
from l3d.core.model import Target
from l3d.core.samples import Dataset


def loop_gradients(model, names, inputs, references, divergence):
    """Oracle: one backward() per sample on an unbatched copy of the model (in grad mode, the
    function autograd differentiates); inputs a tensor or a dict of keyword inputs."""
    grads = {n: [] for n in names}
    for i in range(len(references)):
        m = copy.deepcopy(model)
        m.zero_grad()
        if isinstance(inputs, torch.Tensor):
            out = m(inputs[i : i + 1])
        else:
            out = m(**{k: v[i : i + 1] for k, v in inputs.items()})
        divergence(out[0], references[i]).backward()
        params = dict(m.named_parameters())
        for n in names:
            grads[n].append(params[n].grad.clone())
    return {n: torch.stack(g) for n, g in grads.items()}


@pytest.mark.parametrize("divergence", [mse, kl])
def test_per_sample_gradients_equal_backward_loop(mlp, divergence):
    x = torch.randn(8, 4)
    refs = random_other(mlp(x).detach(), torch.Generator().manual_seed(0))
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    target = Target.create(mlp, names)
    fast = per_sample_gradients(target, x, refs, divergence)
    slow = loop_gradients(mlp, names, x, refs, divergence)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-5, atol=1e-6)


def test_only_selected_tensors_get_gradients(mlp):
    x = torch.randn(5, 4)
    target = Target.create(mlp, ["fc2.*"])
    grads = per_sample_gradients(target, x, mlp(x).detach().flip(0), mse)
    assert set(grads) == {"fc2.weight", "fc2.bias"}
    assert grads["fc2.weight"].shape == (5, 3, 6)


def test_per_token_kl_with_padding_equals_backward_loop(token_model):
    ids = torch.randint(0, 7, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0  # padding at the end of two sequences
    mask[2, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    logits = token_model(ids, mask).detach()
    refs = torch.randn_like(logits)
    names = ["embed.weight", "mix.weight", "mix.bias", "head.weight"]
    fast = per_sample_gradients(Target.create(token_model, names), inputs, refs, kl, per_token=True)
    n_valid = int(mask.sum())
    expected = {n: [] for n in names}
    for b in range(3):
        for t in range(6):
            if not mask[b, t]:
                continue
            m = copy.deepcopy(token_model)
            kl(m(ids[b : b + 1], mask[b : b + 1])[0, t], refs[b, t]).backward()
            params = dict(m.named_parameters())
            for n in names:
                expected[n].append(params[n].grad.clone())
    for n in names:
        assert fast[n].shape[0] == n_valid, "padding positions must never be samples"
        torch.testing.assert_close(fast[n], torch.stack(expected[n]), rtol=1e-5, atol=1e-6)


def test_jacobian_cache_equals_vmap(mlp):
    x = torch.randn(40, 4)
    target = Target.create(mlp, ["fc1.weight", "fc2.bias"])
    sources = [
        GradientSource(
            target,
            kl,
            random_other,
            dataset=Dataset(x, 16),
            per_token=False,
            method=m,
            chunk_size=None,
        )
        for m in ("jacobian", "vmap")
    ]
    a = list(sources[0].epoch(torch.Generator().manual_seed(3)))
    b = list(sources[1].epoch(torch.Generator().manual_seed(3)))
    assert len(a) == len(b) == 3  # 16 + 16 + 8 samples
    for ga, gb in zip(a, b):
        for n in ga.grads:
            torch.testing.assert_close(ga.grads[n], gb.grads[n], rtol=1e-5, atol=1e-6)


def test_random_reference_is_never_the_sample_itself():
    outputs = torch.arange(50.0)[:, None]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        refs = random_other(outputs, g)
        assert (refs != outputs).all()
    # and every other sample gets chosen eventually (uniform over others)
    counts = torch.zeros(50)
    for _ in range(200):
        counts += torch.bincount(random_other(outputs, g)[:, 0].long(), minlength=50)
    assert (counts > 0).all()


@pytest.mark.parametrize("method", ["structured", "vmap", "jacobian"])
def test_zero_input_reference_equals_backward_loop_against_the_zero_inputs_output(mlp, method):
    """reference='zero_input': every sample against f(0), on every gradient path, for a training
    epoch's batches as for an explicit batch."""
    x = torch.randn(8, 4)
    names = ["fc1.weight", "fc2.weight", "fc2.bias"]
    baseline = mlp(torch.zeros(1, 4)).detach()[0]
    slow = loop_gradients(mlp, names, x, baseline.expand(8, -1), mse)
    source = GradientSource(
        Target.create(mlp, names), mse, "zero_input", dataset=Dataset(x, 8), per_token=False,
        method=method,
    )  # fmt: skip
    for batch in (source.batch(x), next(source.epoch(torch.Generator(), shuffle=False))):
        fast = batch.dense()
        for n in names:
            torch.testing.assert_close(fast[n], slow[n], rtol=1e-5, atol=1e-6)


def test_zero_input_reference_refuses_token_inputs(token_model):
    import l3d

    ids = torch.randint(0, 7, (4, 5))
    with pytest.raises(l3d.L3DError, match="reference='zero_input' .* float tensor inputs"):
        l3d.decompose(
            token_model, ids, params=["*"], n_subnetworks=2, epochs=1, per_token=True,
            divergence="kl", reference="zero_input", progress=False,
        )  # fmt: skip


def test_auto_uses_the_jacobian_cache_only_for_small_outputs():
    """Building the cache costs one backward pass per output element per sample: 'auto' takes it
    only up to JACOBIAN_MAX_OUTPUTS outputs per sample (every toy), else the structured path."""
    from l3d.core.gradients.source import JACOBIAN_MAX_OUTPUTS, Method

    def method(n_out, requested="auto"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, n_out)
        )
        source = GradientSource(
            Target.create(model, ["0.weight"]), mse, random_other, per_token=False,
            method=requested, dataset=Dataset(torch.randn(8, 4), 4),
        )  # fmt: skip
        return source.method

    assert method(JACOBIAN_MAX_OUTPUTS) is Method.JACOBIAN
    assert method(JACOBIAN_MAX_OUTPUTS + 1) is Method.STRUCTURED
    assert method(JACOBIAN_MAX_OUTPUTS + 1, "jacobian") is Method.JACOBIAN  # asked for: honoured


def test_jacobian_cache_built_in_chunks_is_the_one_vmap(mlp):
    """The cache is built chunk by chunk (for its progress bar): bitwise what one chunked vmap over
    all samples gave."""
    from torch.func import jacrev, vmap

    from l3d.core.gradients.jacobian import JacobianCache

    x = torch.randn(10, 4)
    target = Target.create(mlp, ["fc1.weight", "fc2.bias"])
    cache = JacobianCache(target, Dataset(x, 4), chunk_size=3)
    jacobian, outputs = cache._build()

    def sample_output(params, xi):
        return target.forward(xi[None], params)[0]

    whole = vmap(jacrev(sample_output), in_dims=(None, 0), chunk_size=3)(target.w0, x)
    expected = torch.cat([j.reshape(10, 3, -1) for j in whole.values()], 2)
    assert torch.equal(jacobian, expected) and torch.equal(outputs, target.outputs(x))


@pytest.mark.parametrize("progress", [True, False])
def test_jacobian_cache_shows_progress_when_slow(mlp, monkeypatch, capsys, progress):
    from l3d.core.gradients import jacobian

    monkeypatch.setattr(jacobian, "PROGRESS_DELAY_SECONDS", 0.0)
    source = GradientSource(
        Target.create(mlp, ["fc1.weight"]), mse, random_other, per_token=False,
        method="jacobian", dataset=Dataset(torch.randn(12, 4), 4), chunk_size=5, progress=progress,
    )  # fmt: skip
    list(source.epoch(torch.Generator().manual_seed(0)))
    err = capsys.readouterr().err
    if progress:
        assert "Jacobian cache" in err and "/12 " in err and "sample/s" in err
    else:
        assert "Jacobian cache" not in err


def test_sample_rows_by_index_and_one_finiteness_flag():
    """Rows gathered with sample_index equal boolean-mask indexing (padding or none), and the
    batched finiteness check names the first tensor with NaN/inf."""
    from l3d import L3DError
    from l3d.core.gradients.batch import check_finite_gradients, sample_index, to_rows
    from l3d.core.samples import SampleRows

    x = torch.randn(3, 4, 2)
    for mask in (torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]]), torch.ones(3, 4)):
        rows = SampleRows(True, mask.bool())
        index, n_samples = sample_index(rows, 3)
        assert n_samples == int(mask.sum()) and (index is None) == bool(mask.all())
        assert torch.equal(to_rows(x, rows, index), rows.rows(x))
    assert sample_index(SampleRows(False, None), 3) == (None, 3)
    check_finite_gradients({"a": x, "b": x})
    with pytest.raises(L3DError, match="'b' contain NaN/inf"):
        check_finite_gradients(
            {"a": x, "b": x.clone().index_fill_(0, torch.tensor([1]), torch.nan), "c": x / 0}
        )


def previous_sample(outputs, generator):
    """Each sample's reference is the output of the one before it: known to the loop oracle."""
    return outputs.roll(1, 0)


def assert_every_backend_equals_the_loop(
    model, inputs, names, methods=("structured", "vmap", "jacobian")
):
    """Each backend's per-sample gradients of one epoch's single batch equal the loop oracle,
    formed without grad, as the trainer and the analyses ask for them."""
    target = Target.create(model, names)
    references = previous_sample(target.outputs(inputs), None)
    slow = loop_gradients(model, names, inputs, references, kl)
    for method in methods:
        source = GradientSource(
            target, kl, previous_sample, per_token=False, method=method,
            dataset=Dataset(inputs, len(references)), progress=False,
        )  # fmt: skip
        with torch.no_grad():
            fast = next(source.epoch(torch.Generator(), shuffle=False)).dense()
        for name in names:
            torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=method)


class PaddedEncoder(nn.Module):
    """A default nn.TransformerEncoder (nested tensors enabled) over padded sequences."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):
        return self.head(self.enc(x, src_key_padding_mask=mask == 0).mean(1))


def test_a_transformer_encoder_is_one_function_in_every_forward():
    """In eval mode without grad, PyTorch's attention fast path (nested tensors, fused kernels)
    is another function (padded positions give 0): interventions at delta 0 differed from the
    outputs whose gradients were decomposed by 0.25, and vmap could not batch it."""
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    mask = torch.ones(12, 5, dtype=torch.long)
    mask[::3, 3:] = 0
    data = {"x": torch.randn(12, 5, 8), "mask": mask}
    names = ["enc.layers.0.linear1.weight", "enc.layers.1.self_attn.in_proj_weight"]
    assert_every_backend_equals_the_loop(model, data, names)
    decomposition = l3d.decompose(
        model, data, params=names, n_subnetworks=2, epochs=1, divergence="kl", progress=False
    )
    torch.testing.assert_close(decomposition.intervene(data, 0, 0.0), model(**data))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0][:, -1])


def test_an_lstm_takes_every_backend():
    """The Jacobian cache was built without grad, where the LSTM's CPU kernel keeps no workspace
    for its backward: `RuntimeError: Expected a proper Tensor but got None ... 'workspace'`."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (6, 5))
    assert_every_backend_equals_the_loop(
        Recurrent(nn.LSTM).eval(), ids, ["rnn.weight_hh_l0", "head.weight"]
    )


def test_auto_takes_no_jacobian_cache_that_jacrev_cannot_build():
    """nn.PReLU: vmap of grad runs it, vmap of jacrev does not (its backward cannot batch), so
    'auto' took the cache and decompose() with its defaults failed, though vmap and the
    structured path both give its gradients."""
    from l3d.core.gradients.source import Method

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.PReLU(3), nn.Linear(3, 2)).eval()
    x = torch.randn(16, 4)
    names = ["0.weight", "1.weight", "2.weight"]
    assert_every_backend_equals_the_loop(model, x, names, methods=("auto", "vmap", "structured"))
    source = GradientSource(
        Target.create(model, names), kl, previous_sample, per_token=False,
        dataset=Dataset(x, 16), progress=False,
    )  # fmt: skip
    assert source.method is not Method.JACOBIAN
    # Forced, the cache says which torch.func transform fails and what runs instead.
    with pytest.raises(l3d.L3DError, match=r"vmap of jacrev \(the Jacobian cache\).*'vmap'"):
        assert_every_backend_equals_the_loop(model, x, names, methods=("jacobian",))


def test_auto_takes_the_structured_path_where_vmap_cannot_run_the_model():
    """vmap cannot batch nn.GRU, so neither the Jacobian cache nor the vmap path can run this
    model; 'auto' took the cache and failed, though the structured path forms the gradients of
    the embedding and the head without vmap."""
    from l3d.core.gradients.source import Method

    torch.manual_seed(0)
    ids = torch.randint(0, 9, (6, 5))
    model = Recurrent(nn.GRU).eval()
    names = ["embed.weight", "head.weight", "head.bias"]
    assert_every_backend_equals_the_loop(model, ids, names, methods=("auto",))
    source = GradientSource(
        Target.create(model, names), kl, previous_sample, per_token=False,
        dataset=Dataset(ids, 6), progress=False,
    )  # fmt: skip
    assert source.method is Method.STRUCTURED


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
def test_weights_of_a_layer_vmap_cannot_batch_take_a_loop_over_samples(cell, caplog):
    """vmap cannot batch nn.GRU or nn.RNN (an in-place write to their unbatched initial state):
    their weights could not be decomposed on any path. The generic path now runs the samples
    one by one where vmap fails, with a warning naming the layer."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (6, 5))
    model = Recurrent(cell).eval()
    names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_hh_l0", "head.weight"]
    with caplog.at_level(logging.WARNING, logger="l3d"):
        assert_every_backend_equals_the_loop(model, ids, names, methods=("auto", "vmap"))
    said = [r.getMessage() for r in caplog.records if "one sample at a time" in r.getMessage()]
    assert said and f"vmap cannot batch 'rnn' ({cell.__name__})" in said[0]
    d = l3d.decompose(model, ids, params=names, n_subnetworks=2, epochs=1, progress=False)
    d.coefficients(ids)
    paths = d.gradient_source(ids).plan.paths
    assert paths["rnn.weight_hh_l0"].startswith("generic torch.func, one sample at a time")


def test_per_token_gradients_of_a_layer_vmap_cannot_batch():
    """The loop over samples for per-token samples: every token's gradient equals autograd's."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (3, 4))

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(9, 4)
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.head = nn.Linear(5, 9)

        def forward(self, input_ids):
            return self.head(self.rnn(self.embed(input_ids))[0])

    model = Tagger().eval()
    names = ["rnn.weight_hh_l0", "head.weight"]
    target = Target.create(model, names)
    refs = torch.randn(3, 4, 9).log_softmax(-1)
    fast = per_sample_gradients(target, ids, refs, kl, per_token=True, loop=True)
    for i in range(3):
        for t in range(4):
            params = dict(model.named_parameters())
            loss = kl(model(ids[i : i + 1])[0, t], refs[i, t])
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for name, g in zip(names, grads):
                torch.testing.assert_close(fast[name][i * 4 + t], g, rtol=1e-4, atol=1e-6)


def test_evaluating_turns_cudnn_off_for_recurrent_models_only_and_restores_it():
    """cuDNN's RNN backward runs in training mode only, and every l3d forward runs in eval
    mode: inside `evaluating`, cuDNN is off for a model with a recurrent layer, and the global
    flag is as before after (an MLP leaves it alone)."""
    from l3d.core.model import evaluating

    before = torch.backends.cudnn.enabled
    try:
        torch.backends.cudnn.enabled = True
        with evaluating(Recurrent(nn.GRU)):
            assert not torch.backends.cudnn.enabled
        assert torch.backends.cudnn.enabled
        with evaluating(nn.Sequential(nn.Linear(2, 2))):
            assert torch.backends.cudnn.enabled
    finally:
        torch.backends.cudnn.enabled = before
