"""The structured fast path equals the torch.func oracle: coefficients, ||g||^2, both losses and the
gradients of the loss with respect to every subnetwork factor, on every supported layer type."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l3d.core.algorithm import SubnetworkPair, step_losses
from l3d.core.divergences import Reference, kl, mse, random_other
from l3d.core.gradients import DenseGradients, GradientSource, per_sample_gradients
from l3d.core.gradients.structured import (
    Projection,
    StructuredGradients,
    StructuredPlan,
    structured_gradients,
)
from l3d.core.model import Target, resolve_ranks
from l3d.core.samples import Dataset, SampleRows
from l3d.errors import L3DError
from test_gradients import assert_every_backend_equals_the_loop

RANDOM = Reference("random", random_other)


@pytest.fixture(params=["signals", "formed"])
def projection(request, monkeypatch):
    """Each way `StructuredGradients.project` may take for a weight: its signal projected, or
    the per-sample gradients formed from it (`_dense_cheaper` chooses by cost)."""
    import l3d.core.gradients.structured as structured

    formed = request.param == "formed"
    monkeypatch.setattr(structured, "_dense_cheaper", lambda *_: formed)
    return request.param


NEVER_CALLED = "generic torch.func (module never called: the forward reads the tensor directly)"


def assert_matches_oracle(
    model: nn.Module,
    inputs,
    patterns=("*",),
    divergence=mse,
    *,
    per_token: bool = False,
    factorization: str = "cp",
    rank: int = 2,
    chunk_size: int | None = None,
) -> StructuredPlan:
    model.eval()
    target = Target.create(model, patterns)
    plan = StructuredPlan.create(target)
    outputs = target.outputs(inputs)
    rows = SampleRows.of(inputs, per_token)
    refs = RANDOM.draw(outputs, rows, torch.Generator().manual_seed(1))
    oracle = DenseGradients(
        per_sample_gradients(target, inputs, refs, divergence, per_token=per_token)
    )
    ranks = resolve_ranks(target.names, rank)
    # Without a projection, gradients are formed (where cheaper) when the batch is projected;
    # with one, as each layer's signal is made.
    for projection in (None, Projection(4, ranks)):
        fast = structured_gradients(
            target, inputs, refs, divergence, plan=plan, per_token=per_token,
            chunk_size=chunk_size, projection=projection,
        )  # fmt: skip
        assert not (projection is None and fast.formed)
        _assert_batch_matches(fast, oracle, target, ranks, factorization)
    return plan


def _assert_batch_matches(fast, oracle, target, ranks, factorization) -> None:
    assert isinstance(fast, StructuredGradients)
    assert fast.n_samples == oracle.n_samples
    # The gradients formed from the signals (what resampling reads) are the oracle's.
    dense = fast.dense()
    assert set(dense) == set(oracle.grads)
    for name, g in oracle.grads.items():
        scale_g = g.abs().max().item() + 1e-12
        torch.testing.assert_close(dense[name], g, rtol=1e-4, atol=1e-5 * scale_g)
    pair = SubnetworkPair.initialize(
        target.shapes, 4, ranks, factorization, torch.Generator().manual_seed(0)
    )
    scale = oracle.project(pair.v_in).abs().max().item()
    torch.testing.assert_close(
        fast.project(pair.v_in), oracle.project(pair.v_in), rtol=1e-4, atol=1e-5 * scale
    )
    torch.testing.assert_close(
        fast.sq_norms(), oracle.sq_norms(), rtol=1e-4, atol=1e-6 * oracle.sq_norms().max().item()
    )
    for loss_name in ("paper", "pooled_squared"):
        (l_fast, m_fast), (l_oracle, m_oracle) = (
            step_losses(pair, batch, 0.3) for batch in (fast, oracle)
        )
        assert torch.equal(m_fast.mask, m_oracle.mask)
        lf, lo = getattr(l_fast, loss_name), getattr(l_oracle, loss_name)
        torch.testing.assert_close(lf, lo, rtol=1e-4, atol=1e-6)
        params = list(pair.parameters())
        for gf, go in zip(torch.autograd.grad(lf, params), torch.autograd.grad(lo, params)):
            torch.testing.assert_close(gf, go, rtol=1e-3, atol=1e-5 * go.abs().max().item() + 1e-8)


class MLPWithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("divergence", [mse, kl])
def test_linear_bias_layernorm(factorization, rank, divergence, projection):
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        MLPWithNorm(),
        torch.randn(9, 4),
        divergence=divergence,
        factorization=factorization,
        rank=rank,
    )
    assert not plan.generic
    assert plan.paths["norm.weight"] == "structured (layernorm)"


class ConvNet(nn.Module):
    """Plain, grouped and depthwise convolutions with stride, padding, dilation, odd kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, dilation=1, groups=8)
        self.c3 = nn.Conv2d(8, 3, (2, 1), padding=(1, 0), dilation=(1, 2), bias=False)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.c3(h).mean((2, 3))


@pytest.mark.parametrize("factorization,rank", [("cp", 1), ("cp", 3), ("tucker", 2)])
def test_conv2d_grouped_and_depthwise(factorization, rank, projection):
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        ConvNet(), torch.randn(5, 4, 7, 7), divergence=kl, factorization=factorization, rank=rank
    )
    assert not plan.generic


class Conv1dNet(nn.Module):
    """1-d convolutions as audio and sequence models use them: plain with stride, grouped,
    depthwise causal (Mamba's: padding k - 1, cut back to the input length), dilated."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(8, 8, 3, padding=2, groups=8)
        self.c3 = nn.Conv1d(8, 4, 3, dilation=2, groups=2, bias=False)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h)[..., : h.shape[-1]])
        return self.c3(h).mean(2)


@pytest.mark.parametrize("factorization,rank", [("cp", 1), ("cp", 3), ("tucker", 2)])
def test_conv1d_plain_grouped_and_depthwise(factorization, rank, projection):
    """nn.Conv1d took the generic path (a whole vmap per batch)."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        Conv1dNet(), torch.randn(5, 3, 17), divergence=kl, factorization=factorization, rank=rank
    )
    assert not plan.generic
    assert plan.paths["c2.weight"] == "structured (conv1d)"


def test_gpt2_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(7, 4), Conv1D(3, 7)  # (nf, nx): weight (nx, nf)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_fc(x))).mean(1)

    torch.manual_seed(0)
    plan = assert_matches_oracle(Net(), torch.randn(6, 5, 4), rank=2)
    assert plan.paths["c_fc.weight"] == "structured (gpt2_conv1d)"


class TokenModel(nn.Module):
    """(batch, seq) ids -> (batch, seq, vocab): embedding (with a padding row), causal running
    mean, LayerNorm, a Linear head exposed as the output head (as HuggingFace models do)."""

    def __init__(self, vocab: int = 9, dim: int = 6, with_head: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.with_head = with_head

    def get_output_embeddings(self):
        return self.head if self.with_head else None

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        h = torch.tanh(self.mix(h.cumsum(1) / counts))
        return self.head(self.norm(h))


def token_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (3, 7), generator=g)
    ids[1, 2] = 0  # the embedding's padding row
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("factorization,rank", [("cp", 1), ("cp", 3), ("tucker", 2)])
def test_per_token_kl_with_padding(with_head, factorization, rank, projection):
    torch.manual_seed(0)
    patterns = ["embed.weight", "mix.*", "norm.*"]
    plan = assert_matches_oracle(
        TokenModel(with_head=with_head),
        token_batch(),
        patterns,
        kl,
        per_token=True,
        factorization=factorization,
        rank=rank,
        chunk_size=3,  # several batched backwards, the last one partial
    )
    assert plan.paths["embed.weight"] == "structured (embedding)"


def test_per_token_head_weights_are_decomposed():
    """The head's per-token signal is its own output cotangent and input at each token, one
    position per (token, sequence): no per-token backward through the head, no (T, n, S, vocab)
    deltas."""
    torch.manual_seed(0)
    patterns = ["head.*", "mix.weight"]
    assert_matches_oracle(TokenModel(), token_batch(), patterns, kl, per_token=True)
    target = Target.create(TokenModel().eval(), patterns)
    refs = torch.randn(3, 7, 9, generator=torch.Generator().manual_seed(0))
    fast = structured_gradients(
        target, token_batch(), refs, kl, plan=StructuredPlan.create(target), per_token=True
    )
    (head,) = fast.matrices["head.weight"]
    assert head.tokens == 7 and head.delta.shape == (1, 7 * 3, 1, 1, 9)


class Mixed(nn.Module):
    """Supported modules beside an unsupported PReLU and a raw parameter, which take the generic
    path inside the structured batch, and a weight tied between two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.act = nn.PReLU(5)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.fc2 = nn.Linear(5, 5)
        self.fc3 = nn.Linear(5, 5)
        self.fc3.weight = self.fc2.weight

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = self.act(h) * self.scale
        return self.fc3(torch.relu(self.fc2(h)))


def test_mixed_supported_and_unsupported_modules(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="l3d.core.gradients.structured"):
        plan = assert_matches_oracle(Mixed(), torch.randn(8, 4), divergence=kl, rank=2)
    assert plan.paths["fc1.weight"] == "structured (linear)"
    assert plan.paths["act.weight"].startswith("generic")
    assert plan.paths["scale"].startswith("generic")
    assert plan.paths["fc2.weight"] == "structured (linear + linear)"  # tied: both uses
    assert "fc1.weight: structured (linear)" in caplog.text


class PositionModel(nn.Module):
    """A position embedding computed once and broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(9, 4)
        self.pos = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 9)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1])[None]
        return self.head(torch.tanh(self.tok(input_ids) + self.pos(positions)))


def test_broadcast_module_falls_back_to_generic():
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (3, 7), generator=torch.Generator().manual_seed(0))
    plan = assert_matches_oracle(PositionModel(), {"input_ids": ids}, divergence=kl, per_token=True)
    assert plan.paths["pos.weight"].startswith("generic")
    assert plan.paths["tok.weight"] == "structured (embedding)"


class Attention(nn.Module):
    """nn.MultiheadAttention: its out_proj is an nn.Linear that is never called (the functional
    attention reads its weight and bias directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("names", [["attn.out_proj.weight"], ["attn.out_proj.bias", "head.weight"]])
def test_a_module_never_called_takes_the_generic_path(names):
    """Its hooks recorded nothing: the signals' concatenation of no calls raised ValueError
    (torch.cat of an empty list) or TypeError (reduce of an empty iterable)."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(Attention(), torch.randn(6, 4, 6), names, divergence=kl)
    assert plan.paths["attn.out_proj." + names[0].rpartition(".")[2]] == NEVER_CALLED


OUTSIDE = "generic torch.func (gradient not all through its module's calls: used outside them?)"


class TiedAutoencoder(nn.Module):
    """TMS written with nn.Linear: the encoder's weight is also the decoder, used directly."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 2, bias=False)
        self.b = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x):
        return torch.relu(self.enc(x) @ self.enc.weight + self.b)


class TiedHeadLM(nn.Module):
    """A causal LM whose output head is the token embedding used directly (h @ wte.weight.T), and
    whose mixing layer's bias also shifts the output (a bias used outside its module)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, input_ids):
        h = torch.tanh(self.mix(self.wte(input_ids).cumsum(1)))
        return (h + self.mix.bias) @ self.wte.weight.T


def test_a_weight_also_used_outside_its_module_falls_back_to_generic():
    """Hooks see a module's own call only: a weight also used directly in forward got the
    gradient of that call alone (relative error 0.42 on the tied autoencoder, 0.82 on the LM's
    tokens), silently. The first batch now compares the hooked calls' gradient with autograd's."""
    torch.manual_seed(0)
    x = torch.rand(8, 5)
    plan = assert_matches_oracle(TiedAutoencoder(), x, ("enc.weight",))
    assert plan.paths["enc.weight"] == OUTSIDE
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    plan = assert_matches_oracle(TiedHeadLM(), ids, divergence=kl, per_token=True)
    assert plan.paths["wte.weight"].startswith("generic") and plan.paths["mix.bias"].startswith(
        "generic"
    )
    assert plan.paths["mix.weight"] == "structured (linear)"


class MaskPositions(nn.Embedding):
    """OPT's learned positions: an Embedding called with the attention mask, whose forward turns
    it into position ids (the hooked input is not the rows it looks up)."""

    def forward(self, attention_mask):  # type: ignore[override]
        return super().forward((attention_mask.cumsum(1) * attention_mask).long())


class OPTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(9, 4)
        self.pos = MaskPositions(8, 4)
        self.head = nn.Linear(4, 9)
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)  # its bias shifts every key's score alike: gradient ~0

    def forward(self, input_ids, attention_mask):
        h = self.tok(input_ids) + self.pos(attention_mask)
        attention = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), -1)
        return self.head(torch.tanh(attention @ h))


def test_a_module_computing_on_other_inputs_than_it_is_called_with_falls_back():
    """An Embedding subclass called with the mask (OPT's positions) took the structured path with
    the mask as token ids: wrong gradients. A key bias, whose gradient is zero up to round-off
    (it shifts every score of a query alike), keeps its structured path."""
    ids = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    plan = assert_matches_oracle(
        OPTLike(), {"input_ids": ids, "attention_mask": mask}, divergence=kl, per_token=True
    )
    assert plan.paths["pos.weight"] == OUTSIDE
    assert plan.paths["k.bias"] == "structured (linear)"
    assert plan.paths["tok.weight"] == "structured (embedding)"


class FlatRowsMLP(nn.Module):
    """OPT's decoder MLP: the hidden states flattened to (batch * seq, hidden) around fc1/fc2,
    sample-major as reshape leaves them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 6)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 6)
        self.head = nn.Linear(6, 9)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids):
        h = self.embed(input_ids).cumsum(1)
        flat = h.reshape(-1, h.shape[-1])
        h = h + self.fc2(torch.relu(self.fc1(flat))).view_as(h)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("per_token", [True, False])
def test_rows_flattened_sample_major_take_the_structured_path(per_token):
    """OPT's fc1/fc2 see (batch * seq, hidden): they took the generic path, about 10x slower."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(0))
    plan = assert_matches_oracle(
        FlatRowsMLP(), {"input_ids": ids}, divergence=kl, per_token=per_token
    )
    assert plan.paths["fc1.weight"] == "structured (linear)"
    assert plan.paths["fc2.bias"] == "structured (linear)"


class SequenceMajor(nn.Module):
    """A layer run on (seq, batch, hidden), as fairseq-style models do: its first axis is not the
    sample even where seq equals batch."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 9)
        self.flatten = flatten

    def forward(self, input_ids):
        h = self.embed(input_ids).cumsum(1).transpose(0, 1)  # (seq, batch, hidden)
        m = self.mix(h.reshape(-1, h.shape[-1]) if self.flatten else h).view_as(h)
        return self.head(torch.tanh(h + m).transpose(0, 1))


@pytest.mark.parametrize("flatten", [False, True])
def test_rows_that_are_not_sample_major_fall_back(flatten):
    """With seq == batch the layer's first axis has the batch's size but holds positions: its
    per-sample gradients were other samples' (their sum is right, so the uses check passed)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (4, 4), generator=torch.Generator().manual_seed(0))
    plan = assert_matches_oracle(
        SequenceMajor(flatten), {"input_ids": ids}, divergence=kl, per_token=True
    )
    assert plan.paths["mix.weight"].startswith("generic")
    assert plan.paths["embed.weight"] == "structured (embedding)"


def test_rows_are_checked_at_the_first_batch_of_several_samples():
    """A first batch of one sequence cannot show how rows group by sample (all are its own):
    the row check waits for a batch of several, where seq == batch read positions as samples."""
    torch.manual_seed(0)
    model = SequenceMajor(flatten=False).eval()
    target = Target.create(model, ["mix.weight", "embed.weight"])
    one = {"input_ids": torch.tensor([[1, 5, 2, 7]])}
    source = GradientSource(target, kl, RANDOM, per_token=True, example=one, progress=False)
    generator = torch.Generator().manual_seed(0)
    for ids in (one["input_ids"], torch.randint(0, 9, (4, 4), generator=generator)):
        x = {"input_ids": ids}
        refs = torch.randn(target.outputs(x).shape, generator=generator)
        fast = source.batch(x, refs).dense()
        oracle = per_sample_gradients(target, x, refs, kl, per_token=True)
        for name, g in oracle.items():
            torch.testing.assert_close(fast[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    assert source.plan.paths["mix.weight"].startswith("generic")


class Routed(nn.Module):
    """A layer applied to a data-dependent subset of the tokens (mixture-of-experts routing):
    ids above 4 only, gathered sample-major."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 6)
        self.expert = nn.Linear(6, 6)
        self.head = nn.Linear(6, 9)

    def forward(self, input_ids):
        h = self.embed(input_ids).cumsum(1)
        chosen = (input_ids > 4).reshape(-1)
        flat = h.reshape(-1, h.shape[-1])
        routed = torch.zeros_like(flat).index_add(
            0, chosen.nonzero()[:, 0], self.expert(flat[chosen])
        )
        return self.head(torch.tanh(h + routed.view_as(h)))


def _token_gradients_by_loop(model: nn.Module, names: list[str], ids, refs) -> dict:
    """Each token's gradient by its own backward: an oracle for models vmap cannot run."""
    params = dict(model.named_parameters())
    logits = model(ids)
    rows = [
        torch.autograd.grad(
            kl(logits[i, t], refs[i, t]), [params[n] for n in names], retain_graph=True
        )
        for i in range(ids.shape[0])
        for t in range(ids.shape[1])
    ]
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


def test_rows_routed_by_the_data_are_never_read_per_sample():
    """A first batch routing two tokens of each sample would pass the row check; a later batch
    routing 3, 1 and 2 has as many rows (a multiple of the batch) grouped otherwise, and its
    per-sample gradients were silently wrong. Only rows flattened over the whole sequence
    (batch * seq) are read per sample: the routed layer takes the generic path, which cannot
    run this model and says so."""
    first = torch.tensor([[5, 6, 1, 1, 1], [1, 7, 1, 8, 1], [1, 1, 1, 5, 5]])
    later = torch.tensor([[5, 6, 7, 1, 1], [1, 1, 1, 8, 1], [1, 1, 1, 5, 5]])
    torch.manual_seed(0)
    model = Routed().eval()
    target = Target.create(model, ["expert.*", "head.weight"])
    source = GradientSource(
        target, kl, RANDOM, per_token=True, example={"input_ids": first}, progress=False
    )
    for ids in (first, later):
        x = {"input_ids": ids}
        refs = RANDOM.draw(target.outputs(x), SampleRows.of(x, True), torch.Generator())
        try:
            fast = source.batch(x, refs).dense()
        except L3DError as err:
            assert "vmap cannot run the model" in str(err)
            break
        oracle = _token_gradients_by_loop(model, target.names, ids, refs)
        for name, g in oracle.items():
            torch.testing.assert_close(
                fast[name].flatten(0, -g.dim()), g, rtol=1e-4, atol=1e-5 * g.abs().max().item()
            )
    assert source.plan.paths["expert.weight"].startswith("generic")


class BatchNormNet(nn.Module):
    """GroupNorm and BatchNorm2d after a convolution, BatchNorm1d on (n, C) and on (n, C, L)
    features; fitted running statistics (eval mode: a fixed affine map per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.bn2d = nn.BatchNorm2d(4)
        self.bn_seq = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 5)
        self.bn1d = nn.BatchNorm1d(5)
        self.frozen = nn.BatchNorm1d(5, affine=False)
        for norm in (self.bn2d, self.bn_seq, self.bn1d, self.frozen):
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2)
            if norm.affine:
                norm.weight.data.normal_(1, 0.3)
                norm.bias.data.normal_(0, 0.3)

    def forward(self, x):
        h = torch.tanh(self.bn2d(self.gn(self.conv(x))))  # (n, 4, 5, 5)
        h = torch.tanh(self.bn_seq(h.flatten(2))).mean(2)  # (n, 4, 25) -> (n, 4)
        return self.frozen(self.bn1d(self.fc(h)))


@pytest.mark.parametrize("divergence", [mse, kl])
def test_batch_and_group_norms_take_the_structured_path(divergence, projection):
    """Eval-mode BatchNorm scales and shifts took the generic path: 2.2x the time of a digits
    CNN block's batch (26.2 against 11.8 ms for 64 images, one thread)."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(BatchNormNet(), torch.randn(7, 3, 5, 5), divergence=divergence)
    for name in ("bn2d", "bn_seq", "bn1d"):
        assert plan.paths[f"{name}.weight"] == "structured (batchnorm)"
        assert plan.paths[f"{name}.bias"] == "structured (batchnorm)"
    assert plan.paths["gn.weight"] == "structured (groupnorm)"
    assert not plan.generic


class InstanceNormNet(nn.Module):
    """InstanceNorm with a learned affine map, normalising each sample's channels by their own
    statistics (2-d), or by fitted running statistics (1-d, track_running_stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # a bias the norm removes
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.tracked = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.fc = nn.Linear(4, 3)
        for norm in (self.inorm, self.tracked):
            norm.weight.data.normal_(1, 0.3)
            norm.bias.data.normal_(0, 0.3)
        self.tracked.running_mean.normal_(0, 0.5)
        self.tracked.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = torch.tanh(self.inorm(self.conv(x)))  # (n, 4, 5, 5)
        return self.fc(torch.tanh(self.tracked(h.flatten(2))).mean(2))


@pytest.mark.parametrize("divergence", [mse, kl])
def test_instance_norms_take_the_structured_path(divergence):
    """InstanceNorm's scale and shift took the generic path (a vmap of the whole model)."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(InstanceNormNet(), torch.randn(7, 3, 5, 5), divergence=divergence)
    for name in ("inorm", "tracked"):
        assert plan.paths[f"{name}.weight"] == "structured (instancenorm)"
        assert plan.paths[f"{name}.bias"] == "structured (instancenorm)"
    assert not plan.generic


class IdsPositions(nn.Embedding):
    """Called with the token ids, looks up positions: the ids can exceed its rows."""

    def forward(self, input_ids):  # type: ignore[override]
        positions = torch.arange(input_ids.shape[1])
        return super().forward(positions.expand_as(input_ids))


class IdsPositionsLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 4)
        self.pos = IdsPositions(6, 4)
        self.head = nn.Linear(4, 11)

    def forward(self, input_ids):
        return self.head(torch.tanh((self.tok(input_ids) + self.pos(input_ids)).cumsum(1)))


def test_an_embedding_called_with_values_past_its_rows_falls_back():
    """The uses check indexed the weight with the hooked ids (10 in a table of 6 rows): an
    IndexError traceback from the first `impact` on such a model."""
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 10
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        IdsPositionsLM(), {"input_ids": ids}, divergence=kl, per_token=True
    )
    assert plan.paths["pos.weight"] == "generic torch.func (called with other values than row ids)"
    assert plan.paths["tok.weight"] == "structured (embedding)"


class TiedLM(nn.Module):
    """A token embedding tied to the output head (registered in both modules, as transformers
    ties them); `pooled`: one output per sequence instead of per position."""

    def __init__(self, pooled: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.embed.weight
        self.pooled = pooled

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        h = torch.tanh(self.mix(h.cumsum(1) / counts))
        return self.head(h.mean(1) if self.pooled else h)


@pytest.mark.parametrize("factorization,rank", [("cp", 1), ("cp", 3), ("tucker", 2)])
@pytest.mark.parametrize("per_token", [True, False])
def test_a_tied_embedding_takes_the_structured_path_through_both_uses(
    per_token, factorization, rank, projection
):
    """A weight registered in two modules (the token embedding and the head) took the generic
    path: for a language model's embedding, per-sample gradients of (vocab x dim) numbers each.
    Its per-sample gradient is the sum of both uses' signals; ||g||^2 has their cross term."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        TiedLM(pooled=not per_token),
        token_batch(),
        ["embed.weight", "mix.*"],
        kl,
        per_token=per_token,
        factorization=factorization,
        rank=rank,
        chunk_size=3,
    )
    assert plan.paths["embed.weight"] == "structured (embedding + linear)"
    assert not plan.generic


def test_a_weight_tied_to_an_unsupported_module_takes_the_generic_path():
    class Holder(nn.Module):
        def __init__(self, weight: nn.Parameter) -> None:
            super().__init__()
            self.weight = weight

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.other = Holder(self.fc.weight)

        def forward(self, x):
            return torch.tanh(self.fc(x)) @ self.other.weight

    torch.manual_seed(0)
    plan = assert_matches_oracle(Net(), torch.randn(6, 4), ["fc.weight"])
    assert plan.paths["fc.weight"] == "generic torch.func (tied to another module's parameter)"


class ScaledEmbedding(nn.Embedding):
    """transformers' scaled word embedding (Gemma's): the looked-up rows times `embed_scale`;
    `factor` != 1 computes something else than the attribute says."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__(11, 4)
        self.register_buffer("embed_scale", torch.tensor(2.0), persistent=False)
        self.factor = factor

    def forward(self, input_ids):  # type: ignore[override]
        return super().forward(input_ids) * self.embed_scale * self.factor


class ScaledLM(nn.Module):
    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.tok = ScaledEmbedding(factor)
        self.head = nn.Linear(4, 11)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.tok(input_ids).cumsum(1)))


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_a_scaled_embedding_takes_the_structured_path_when_it_scales_as_it_says(factor):
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        ScaledLM(factor), {"input_ids": ids}, divergence=kl, per_token=True
    )
    structured = plan.paths["tok.weight"] == "structured (embedding)"
    assert structured == (factor == 1.0), plan.paths["tok.weight"]


class LlamaStyleRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, as written there."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(size))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class GemmaStyleRMSNorm(nn.Module):
    """Gemma's: scales by (1 + weight)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(0.3 * torch.randn(size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class OddRMSNorm(LlamaStyleRMSNorm):
    """Named like one, computes something else: the uses check must catch it."""

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + 1)


class NormBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.torch_norm = nn.RMSNorm(8)
        self.llama = LlamaStyleRMSNorm(8)
        self.gemma = GemmaStyleRMSNorm(8)
        self.odd = OddRMSNorm(8)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.torch_norm.weight.add_(0.3 * torch.randn(8))

    def forward(self, x):
        h = self.fc(x)
        h = self.llama(torch.tanh(self.torch_norm(h))) + self.gemma(h)
        return self.head(self.odd(torch.tanh(h)))


@pytest.mark.parametrize("shape", [(12, 6), (3, 4, 6)])
def test_rms_norms_take_the_structured_path(shape):
    """RMSNorm weights (Llama, Qwen, Mistral, Gemma: two per layer) took the generic path, a
    vmap over the whole model for a vector: 0.100 -> 0.166 s per batch for one Llama norm."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(NormBlocks(), torch.randn(*shape))
    for name in ("torch_norm", "llama", "gemma"):
        assert plan.paths[f"{name}.weight"] == "structured (rmsnorm)", name
    assert plan.paths["odd.weight"] == OUTSIDE


def test_auto_picks_structured_and_vmap_forces_generic():
    torch.manual_seed(0)
    model = MLPWithNorm().eval()
    target = Target.create(model, ["fc1.weight", "fc2.*"])
    # Batches from an iterable: no Jacobian cache, so 'auto' chooses between the other two.
    data = [torch.randn(6, 4) for _ in range(2)]

    def source(method):
        return GradientSource(
            target,
            mse,
            random_other,
            dataset=Dataset(data, 6),
            per_token=False,
            method=method,
            chunk_size=None,
        )

    fast, generic = source("auto"), source("vmap")
    assert fast.method == "structured" and generic.method == "vmap"
    b_fast = fast.batch(data[0], generator=torch.Generator().manual_seed(3))
    b_generic = generic.batch(data[0], generator=torch.Generator().manual_seed(3))
    assert isinstance(b_fast, StructuredGradients) and isinstance(b_generic, DenseGradients)
    torch.testing.assert_close(b_fast.sq_norms(), b_generic.sq_norms(), rtol=1e-4, atol=1e-7)


def test_chunked_contractions_match(monkeypatch):
    """A tiny intermediate budget forces one sequence per chunk; results are unchanged."""
    import l3d.core.gradients.structured

    monkeypatch.setattr(l3d.core.gradients.structured, "CHUNK_ELEMENTS", 50)
    torch.manual_seed(0)
    assert_matches_oracle(ConvNet(), torch.randn(3, 4, 7, 7), rank=2)
    assert_matches_oracle(TokenModel(), token_batch(), ["mix.weight"], kl, per_token=True, rank=3)


def test_training_run_matches_generic_path():
    """A whole decomposition (training, evaluation) is the same on either path."""
    from l3d import decompose

    data = {k: v.repeat(2, 1) for k, v in token_batch().items()}

    def run(method):
        torch.manual_seed(0)
        return decompose(
            TokenModel(),
            data,
            params=["mix.weight", "norm.*", "embed.weight"],
            n_subnetworks=3,
            rank=2,
            divergence="kl",
            per_token=True,
            epochs=2,
            batch_size=3,
            progress=False,
            gradient_method=method,
        )

    fast, generic = run("structured"), run("vmap")
    for a, b in zip(fast.history, generic.history):
        assert a["loss_paper"] == pytest.approx(b["loss_paper"], rel=1e-4)
    assert fast.evaluation.loss_pooled_squared == pytest.approx(
        generic.evaluation.loss_pooled_squared, rel=1e-4
    )
    # Adam divides by sqrt(v): float-level gradient differences on near-zero entries move them by
    # up to ~lr * 1e-2 after a few steps, so directions agree to 1e-3, not to float precision.
    for k in range(3):
        for name, v in fast.v_out(k).items():
            torch.testing.assert_close(v, generic.v_out(k)[name], rtol=0, atol=1e-3)


def assert_chunked_step_matches(whole, pair, chunked, chunked_pair, loss: str) -> None:
    """The two-pass chunked step gives the whole batch's top-k mask, both losses and the trained
    loss's factor gradients."""
    from l3d.core.algorithm import chunked_step

    result, mask = step_losses(pair, whole, 0.3)
    getattr(result, loss).backward()
    c_result, c_mask = chunked_step(chunked_pair, chunked, 0.3, loss)
    assert torch.equal(mask.mask, c_mask.mask)
    for name in ("paper", "pooled_squared"):
        torch.testing.assert_close(getattr(c_result, name), getattr(result, name).detach())
    for p, q in zip(pair.parameters(), chunked_pair.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max())


@pytest.mark.parametrize("loss", ["paper", "pooled_squared"])
def test_sample_chunks_match_the_whole_batch(loss):
    """chunk_size on the structured path: the two-pass chunked step gives the whole batch's losses,
    top-k mask and factor gradients (uneven chunks, and a zero-gradient sample that the paper
    loss must skip with the batch's live count)."""
    from l3d.core.gradients import ChunkedGradients

    torch.manual_seed(0)
    model = MLPWithNorm().eval()
    data = torch.randn(10, 4)
    target = Target.create(model, ["*"])
    refs = RANDOM.draw(
        target.outputs(data), SampleRows.of(data, False), torch.Generator().manual_seed(1)
    )
    refs[6] = target.outputs(data[6:7])[0]  # sample 6: reference = own output, g = 0

    def batch_and_pair(chunk_size):
        source = GradientSource(
            target,
            mse,
            random_other,
            dataset=Dataset(data, 10),
            per_token=False,
            method="structured",
            chunk_size=chunk_size,
        )
        pair = SubnetworkPair.initialize(
            target.shapes, 4, resolve_ranks(target.names, 2), "cp", torch.Generator().manual_seed(0)
        )
        return source.batch(data, refs), pair

    whole, pair = batch_and_pair(None)
    chunked, chunked_pair = batch_and_pair(4)
    assert isinstance(whole, StructuredGradients) and isinstance(chunked, ChunkedGradients)
    assert [p().n_samples for p in chunked.parts] == [4, 4, 2]
    assert_chunked_step_matches(whole, pair, chunked, chunked_pair, loss)
    torch.testing.assert_close(chunked.sq_norms(), whole.sq_norms())
    g_sq = chunked.sq_norms()
    assert g_sq[6] < torch.finfo(g_sq.dtype).eps * g_sq.max()  # not live: skipped by 'paper'


@pytest.mark.parametrize("loss", ["paper", "pooled_squared"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_sequence_chunks_match_the_whole_batch_per_token(loss, with_mask):
    """sequence_chunk_size with per-token samples: chunks of whole sequences (padding included)
    give the whole batch's references, losses, top-k mask and factor gradients; token ids without
    an attention mask make every position a sample."""
    from l3d.core.gradients import ChunkedGradients

    torch.manual_seed(0)
    model = TokenModel().eval()
    inputs = token_batch()  # 3 sequences with 5, 7 and 6 valid tokens
    if not with_mask:
        inputs = inputs["input_ids"]  # 3 x 7 tokens, all samples
    target = Target.create(model, ["embed.weight", "mix.*", "norm.*", "head.weight"])

    def batch_and_pair(sequence_chunk_size):
        source = GradientSource(
            target,
            kl,
            random_other,
            dataset=Dataset(inputs, 3),
            per_token=True,
            method="structured",
            chunk_size=4,
            sequence_chunk_size=sequence_chunk_size,
        )
        pair = SubnetworkPair.initialize(
            target.shapes, 4, resolve_ranks(target.names, 2), "cp", torch.Generator().manual_seed(0)
        )
        return source.batch(inputs, generator=torch.Generator().manual_seed(1)), pair

    whole, pair = batch_and_pair(None)
    chunked, chunked_pair = batch_and_pair(2)
    assert isinstance(whole, StructuredGradients) and isinstance(chunked, ChunkedGradients)
    sizes, total = ([12, 6], 18) if with_mask else ([14, 7], 21)
    assert [p().n_samples for p in chunked.parts] == sizes
    assert chunked.n_samples == whole.n_samples == total
    assert_chunked_step_matches(whole, pair, chunked, chunked_pair, loss)


def test_decomposition_with_sample_chunks_matches_whole_batches():
    """Training and evaluation through chunk_size (Trainer and evaluate on ChunkedGradients)
    follow the unchunked run."""
    from l3d import decompose

    data = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))

    def run(chunk_size):
        torch.manual_seed(0)
        return decompose(
            MLPWithNorm(),
            data,
            params=["*"],
            n_subnetworks=3,
            rank=2,
            epochs=2,
            batch_size=8,
            progress=False,
            gradient_method="structured",
            chunk_size=chunk_size,
        )

    whole, chunked = run(None), run(3)
    for a, b in zip(whole.history, chunked.history):
        assert b["loss_paper"] == pytest.approx(a["loss_paper"], rel=1e-5)
    assert chunked.evaluation.loss_pooled_squared == pytest.approx(
        whole.evaluation.loss_pooled_squared, rel=1e-4
    )
    torch.testing.assert_close(chunked.evaluation.p_active, whole.evaluation.p_active)


@pytest.mark.parametrize(
    "tokens,rank,groups,embedding",
    [
        (1, 3, 1, False),  # one sample per sequence: (delta_s . L_kr) first, one product
        (1, 3, 2, False),  # the same per conv group
        (4, 1, 1, False),  # per-token samples at rank 1: delta first too
        (4, 3, 1, False),  # per-token: V_k a_s shared by the tokens (_TokenProjection)
        (4, 3, 2, False),  # ... one projection per group
        (4, 3, 1, True),  # ... from an embedding's token ids
    ],
)
@pytest.mark.parametrize("chunk_elements", [1 << 25, 40])
def test_projection_and_its_gradient_equal_the_dense_oracle(
    tokens, rank, groups, embedding, chunk_elements, monkeypatch
):
    """<V_k, g_(t,i)> from the signals and its gradient in every factor equal the contraction of
    the dense per-sample gradients (float64), with sequences in one chunk or one per chunk."""
    import l3d.core.gradients.structured as structured
    from l3d.core.subnetworks import TensorFactors

    monkeypatch.setattr(structured, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    n, positions, out_g, in_g, vocab = 3, 5, 4, 6, 7
    delta = torch.randn(tokens, n, positions, groups, out_g, generator=g, dtype=torch.float64)
    if embedding:  # weight (vocab, dim): the output side is mode 1
        a = torch.randint(0, vocab, (n, positions), generator=g)
        sig = structured._MatrixSignal(delta, a, 1, (vocab, out_g))
    else:
        a = torch.randn(n, positions, groups, in_g, generator=g, dtype=torch.float64)
        sig = structured._MatrixSignal(delta, a, 0, (groups * out_g, in_g), groups)
    factors = TensorFactors(sig.shape, 5, rank, "cp", g, torch.float64)
    weights = torch.randn(tokens, n, 5, generator=g, dtype=torch.float64)
    fast = structured._project_matrix(sig, factors)
    dense = structured._dense_matrix(sig).flatten(0, 1)  # (T n, *shape)
    oracle = factors.inner(dense).view(tokens, n, 5)
    torch.testing.assert_close(fast, oracle)
    params = list(factors.parameters())
    for g_fast, g_oracle in zip(
        torch.autograd.grad((fast * weights).sum(), params),
        torch.autograd.grad((oracle * weights).sum(), params),
    ):
        torch.testing.assert_close(g_fast, g_oracle)


@pytest.mark.parametrize(
    "layer,positions,n_subnetworks,rank,samples,formed",
    [
        ((64, 64, 3), 1024, 16, 2, 64, True),  # a CNN's first stage: 3.6x faster formed
        ((64, 64, 3), 64, 16, 2, 64, True),  # 8 x 8 positions: 1.3x faster formed
        ((256, 256, 3), 64, 32, 2, 64, False),  # a large kernel on few positions: 5x slower
        ((128, 128, 3), 64, 8, 1, 64, False),  # few subnetworks: 4x slower formed
        ((64, 64, 3), 1024, 64, 4, 2, False),  # the directions outgrow the signal of 2 samples
        ((3072, 768, 1), 128, 64, 1, 8, False),  # a transformer's MLP on sequences of 128
        ((64, 10, 1), 1, 16, 2, 64, False),  # a Linear read once per sample
    ],
)
def test_the_projection_forms_gradients_where_that_is_faster(
    layer, positions, n_subnetworks, rank, samples, formed
):
    """`_dense_cheaper` forms a weight's per-sample gradients where, measured on one CPU thread
    (benchmarks/bench_formed.py), projecting them beat projecting the signal (many positions on
    a small kernel), and never where they or the dense directions would outgrow the signal."""
    import l3d.core.gradients.structured as structured

    out, inputs, kernel = layer
    shape = (out, inputs, kernel, kernel) if kernel > 1 else (out, inputs)
    sig = structured._MatrixSignal(
        torch.zeros(1, samples, positions, 1, out),
        torch.zeros(samples, positions, 1, inputs * kernel * kernel),
        0,
        shape,
    )
    assert structured._dense_cheaper(sig.dims, n_subnetworks, rank) is formed


def test_gradients_are_formed_as_signals_are_made_when_the_projection_is_known():
    """Formed after all signals were made, a CNN's batch held every layer's unfolded patches at
    once (the step's peak); given the subnetworks it is for, each layer's gradients are formed
    as its signal is made, and the batch holds no signal for them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2048, 3)
    )
    inputs = torch.randn(6, 8, 16, 16)
    target = Target.create(model, ["0.weight", "3.weight"])
    plan = StructuredPlan.create(target)
    refs = torch.zeros(6, 3)
    ranks = resolve_ranks(target.names, 2)
    lazy = structured_gradients(target, inputs, refs, mse, plan=plan)
    assert set(lazy.matrices) == {"0.weight", "3.weight"} and not lazy.formed
    eager = structured_gradients(
        target, inputs, refs, mse, plan=plan, projection=Projection(4, ranks)
    )
    assert eager.formed == {"0.weight"} and set(eager.matrices) == {"3.weight"}
    pair = SubnetworkPair.initialize(target.shapes, 4, ranks, "cp", torch.Generator())
    torch.testing.assert_close(eager.project(pair.v_in), lazy.project(pair.v_in))
    assert lazy.formed == {"0.weight"}  # formed by the projection


def test_formed_convolution_gradients_never_unfold_patches(monkeypatch):
    """A convolution's unfolded patches hold kernel-size times its input (a 3 x 3 kernel: nine
    times): where its per-sample gradients are formed, as signals are made and in the first
    batch's checks, they come from its inputs and output-gradients directly, and equal the
    oracle's (grouped, dilated, strided, 1-d, 3-d, reflect-padded and transposed layers)."""
    import l3d.core.gradients.structured as structured

    def refuse(*_):
        raise AssertionError("patches unfolded")

    monkeypatch.setattr(structured, "_dense_cheaper", lambda *_: True)
    monkeypatch.setattr(structured, "_conv_patches", refuse)
    torch.manual_seed(0)
    cases = [
        (
            nn.Sequential(
                nn.Conv2d(4, 6, 3, padding=1, groups=2),
                nn.ReLU(),
                nn.Conv2d(6, 6, 3, stride=2, dilation=2, padding_mode="reflect", padding=2),
                nn.Flatten(),
                nn.Linear(6 * 4 * 4, 3),
            ),
            torch.randn(5, 4, 8, 8),
        ),
        (nn.Sequential(nn.Conv1d(3, 4, 5, padding="same"), nn.Flatten()), torch.randn(5, 3, 9)),
        (nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Flatten()), torch.randn(4, 2, 4, 4, 4)),
        (
            nn.Sequential(
                nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                nn.Tanh(),
                nn.ConvTranspose2d(6, 2, 2, dilation=2),
                nn.Flatten(),
            ),
            torch.randn(5, 4, 3, 4),
        ),
        (nn.Sequential(nn.ConvTranspose1d(3, 4, 4, stride=2), nn.Flatten()), torch.randn(5, 3, 6)),
    ]
    for model, inputs in cases:
        model.eval()
        target = Target.create(model, ["*"])
        plan = StructuredPlan.create(target)
        refs = RANDOM.draw(target.outputs(inputs), SampleRows.of(inputs, False), torch.Generator())
        oracle = DenseGradients(per_sample_gradients(target, inputs, refs, mse))
        ranks = resolve_ranks(target.names, 2)
        fast = structured_gradients(
            target, inputs, refs, mse, plan=plan, projection=Projection(4, ranks)
        )
        convs = {n for n in target.names if n.endswith("weight") and target.w0[n].dim() > 2}
        assert convs and convs <= fast.formed
        assert all(path.startswith("structured") for path in plan.paths.values())
        _assert_batch_matches(fast, oracle, target, ranks, "cp")


def test_token_projection_gradcheck():
    """The hand-written backward of the per-token projection against finite differences."""
    from l3d.core.gradients.structured import _TokenProjection

    g = torch.Generator().manual_seed(0)
    k, r, n, positions, out, tokens = 3, 2, 2, 3, 4, 5

    def randn(*shape, grad=True):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return x.requires_grad_(grad)

    inputs = (
        randn(k, r, out),
        randn(k, r, n * positions),
        randn(tokens, n, positions * out, grad=False),
    )
    assert torch.autograd.gradcheck(_TokenProjection.apply, inputs)


class CausalConv1d(nn.Conv1d):
    """A TCN's causal convolution: it pads its input itself."""

    def forward(self, x):
        return super().forward(F.pad(x, ((self.kernel_size[0] - 1) * self.dilation[0], 0)))


class FlatLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x.flatten(1))


CAUSAL = nn.Sequential(CausalConv1d(3, 4, 3, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(40, 3))
FLAT = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), FlatLinear(27, 3))


@pytest.mark.parametrize(
    ("model", "x"), [(CAUSAL, torch.randn(8, 3, 10)), (FLAT, torch.randn(8, 2, 5, 5))]
)
def test_a_layer_subclass_transforming_its_input_takes_the_generic_path(model, x):
    """The hooks read the input the subclass was called with, not the one its layer computed on
    (padded, flattened): the first batch's check crashed (RuntimeError: shape '[1, 20, 1, 9]' is
    invalid for input of size 108)."""
    torch.manual_seed(0)
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    assert_every_backend_equals_the_loop(model.eval(), x, names, ("structured",))
    source = GradientSource(
        Target.create(model, names), kl, random_other, per_token=False, method="structured",
        example=x, progress=False,
    )  # fmt: skip
    source.batch(x, None, torch.Generator().manual_seed(0))
    assert source.plan is not None
    paths = source.plan.paths
    assert any("overrides forward" in paths.get(n, "") for n in names), paths


class VideoNet(nn.Module):
    """3-d convolutions as video and volume models use them: strided, dilated, grouped, padded
    by number and by mode, with a BatchNorm3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1))
        self.bn = nn.BatchNorm3d(4)
        self.c2 = nn.Conv3d(
            4, 4, 3, dilation=(1, 1, 2), groups=2, padding=1, padding_mode="reflect"
        )
        self.bn.running_mean.normal_(0, 0.3)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x)))).mean((2, 3, 4))


@pytest.mark.parametrize("factorization,rank", [("cp", 1), ("cp", 3), ("tucker", 2)])
def test_conv3d_takes_the_structured_path(factorization, rank, projection):
    """nn.Conv3d took the generic path (a vmap of the whole model per batch)."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        VideoNet(), torch.randn(4, 2, 3, 6, 7), divergence=kl, factorization=factorization,
        rank=rank,
    )  # fmt: skip
    assert not plan.generic
    assert plan.paths["c2.weight"] == "structured (conv3d)"


class PaddedConvs(nn.Module):
    """Convolutions padding by name or by mode: 'same' with an even kernel (torch pads one more
    at the end), reflect, replicate and circular, in 1-d and 2-d, strided."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(2, 4, (2, 3), padding="same", dilation=(1, 2))
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=2)
        self.replicate = nn.Conv2d(4, 3, 3, stride=2, padding=(1, 2), padding_mode="replicate")
        self.circular = nn.Conv1d(3, 3, 4, padding="same", padding_mode="circular", bias=False)

    def forward(self, x):
        h = torch.tanh(self.reflect(torch.tanh(self.same(x))))
        h = torch.tanh(self.replicate(h)).flatten(2)  # (n, 3, L)
        return self.circular(h).mean(2)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("factorization,rank", [("cp", 1), ("cp", 3), ("tucker", 2)])
def test_convolutions_padding_by_name_or_mode_take_the_structured_path(
    factorization, rank, projection
):
    """padding='same' and reflect/replicate/circular padding took the generic path (a vmap of the
    whole model per batch)."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        PaddedConvs(), torch.randn(5, 2, 6, 7), divergence=kl, factorization=factorization,
        rank=rank,
    )  # fmt: skip
    assert not plan.generic
    assert plan.paths["circular.weight"] == "structured (conv1d)"


class Decoder(nn.Module):
    """Transposed convolutions as decoders use them: strided with output_padding, grouped and
    dilated, called with output_size, in 2-d and 1-d."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.grouped = nn.ConvTranspose2d(4, 6, (2, 3), dilation=(2, 1), groups=2, bias=False)
        self.up1d = nn.ConvTranspose1d(6, 2, 4, stride=3, padding=2)
        # output_padding up to the dilation (past the stride): rows the adjoint convolution
        # maps to positions past the input's
        self.padded = nn.ConvTranspose1d(2, 2, 2, dilation=3, output_padding=2)

    def forward(self, x):
        h = torch.tanh(self.up(x, output_size=[2 * x.shape[2], 2 * x.shape[3]]))
        h = torch.tanh(self.grouped(h)).flatten(2)  # (n, 6, L)
        return self.padded(torch.tanh(self.up1d(h))).mean(2)


@pytest.mark.parametrize("factorization,rank", [("cp", 1), ("cp", 3), ("tucker", 2)])
def test_transposed_convolutions_take_the_structured_path(factorization, rank, projection):
    """ConvTranspose1d/2d took the generic path (a vmap of the whole model per batch). Their
    weight's gradient is a convolution's, with input and output-gradient swapped: the input at
    each position times the unfolded patch of the output-gradient."""
    torch.manual_seed(0)
    plan = assert_matches_oracle(
        Decoder(), torch.randn(5, 3, 3, 4), divergence=kl, factorization=factorization, rank=rank
    )
    assert not plan.generic
    assert plan.paths["up.weight"] == "structured (conv_transpose2d)"
    assert plan.paths["up1d.bias"] == "structured (conv_transpose1d)"


class TransposedTagger(nn.Module):
    """A per-token model with a transposed convolution over the sequence (same length)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.up = nn.ConvTranspose1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 9)

    def forward(self, input_ids):
        h = self.up(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h))


def test_a_transposed_convolution_with_per_token_samples_takes_the_generic_path():
    """Token t's output-gradient differs by token and its patches with it, while the signal
    keeps one input per sequence: per token, the layer's tensors take the generic path."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (3, 5))
    plan = assert_matches_oracle(TransposedTagger(), ids, divergence=kl, per_token=True)
    said = "generic torch.func (a transposed convolution with per-token samples)"
    assert plan.paths["up.weight"] == said and plan.paths["up.bias"] == said
    assert plan.paths["head.weight"] == "structured (linear)"


class ConvTagger(nn.Module):
    """A per-token model with a (not transposed) convolution over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 9)

    def forward(self, input_ids):
        h = self.conv(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h))


def test_a_convolution_with_per_token_samples_is_formed_per_token(projection):
    """Token t's output-gradient reaches every position: where a convolution's gradients are
    formed, each token's are its own (the first token's alone were formed for all)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (3, 5))
    plan = assert_matches_oracle(ConvTagger(), ids, divergence=kl, per_token=True)
    assert plan.paths["conv.weight"] == "structured (conv1d)"


class InPlaceAfterLayers(nn.Module):
    """A ResNet block's in-place habits: ReLU(inplace=True) on a BatchNorm's and a Linear's
    output, `out += identity` on another BatchNorm's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)
        for norm in (self.bn1, self.bn2):
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.data.normal_(1, 0.3)
            norm.bias.data.normal_(0, 0.3)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.head(self.relu(self.fc(self.relu(out).mean((2, 3)))))


def test_outputs_changed_in_place_take_the_structured_path(projection):
    """An in-place op on a layer's output (ResNet's BatchNorm + ReLU(inplace=True), out +=
    identity) sent the layer's tensors to the generic path: the hooked output had become the
    ReLU's. Such layers' outputs are now copied before the op. (An input changed in place
    after its layer read it fails autograd's own version check.)"""
    torch.manual_seed(0)
    plan = assert_matches_oracle(InPlaceAfterLayers(), torch.randn(6, 3, 5, 5), divergence=kl)
    assert not plan.generic
    assert plan.paths["bn2.bias"] == "structured (batchnorm)"


def _conv_layers():
    """Random valid Conv2d / Conv3d / ConvTranspose2d / ConvTranspose3d settings, an input size
    they accept, and what follows them (a norm, an in-place ReLU)."""
    from hypothesis import strategies as st

    @st.composite
    def layers(draw):
        transposed = draw(st.booleans())
        groups = draw(st.sampled_from([1, 2]))
        c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        dims = draw(st.sampled_from([2, 3]))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2))
        reach = dilation * (max(kernel) - 1)
        options: dict = {"stride": stride, "dilation": dilation, "groups": groups}
        if transposed:
            options["padding"] = draw(st.integers(0, reach // 2))
            options["output_padding"] = draw(st.integers(0, max(stride, dilation) - 1))
        elif stride == 1 and draw(st.booleans()):
            options["padding"] = "same"
        else:
            options["padding"] = draw(st.integers(0, reach // 2))
        if not transposed:
            options["padding_mode"] = draw(st.sampled_from(["zeros", "reflect", "circular"]))
        size = reach + 1 + draw(st.integers(1, 3))
        kinds = {2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}
        kind = kinds[dims][transposed]
        # An InstanceNorm cancels a kernel of one number per output channel and a bias (their
        # gradients are 0, round-off on either path): it follows a kernel of several, no bias.
        several = (c_in // groups) * math.prod(kernel) > 1
        norm = draw(
            st.sampled_from(["none", "batch", "instance"] if several else ["none", "batch"])
        )
        bias = norm != "instance" and draw(st.booleans())
        layer = kind(c_in, c_out, kernel, bias=bias, **options)
        return layer, c_in, size, norm, draw(st.booleans())

    return layers()


class _FuzzNet(nn.Module):
    def __init__(self, layer: nn.Module, channels: int, norm: str, inplace: bool) -> None:
        super().__init__()
        self.layer = layer
        three = layer.weight.dim() == 5
        self.norm = {
            "none": nn.Identity(),
            "batch": (nn.BatchNorm3d if three else nn.BatchNorm2d)(channels),
            "instance": (nn.InstanceNorm3d if three else nn.InstanceNorm2d)(channels, affine=True),
        }[norm]
        if norm == "batch":
            self.norm.running_mean.normal_(0, 0.3)
            self.norm.running_var.uniform_(0.5, 2)
        self.relu = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        h = self.relu(self.norm(self.layer(x)))
        return self.head(h.mean(tuple(range(2, h.dim()))))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_random_convolutions_match_the_oracle():
    """Random 2-d and 3-d convolution and transposed-convolution settings (groups, stride,
    dilation, padding by number, 'same' or mode, output_padding), followed by a BatchNorm, an
    InstanceNorm or nothing and a ReLU in place or not: the structured path equals torch.func in
    every case."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,  # the same examples in every run (400 random ones passed once)
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(_conv_layers())
    def check(drawn):
        layer, c_in, size, norm, inplace = drawn
        torch.manual_seed(0)
        out = layer.out_channels
        model = _FuzzNet(layer, out, norm, inplace)
        spatial = (size, size + 1, size)[: layer.weight.dim() - 2]
        plan = assert_matches_oracle(model, torch.randn(4, c_in, *spatial), divergence=kl)
        assert not plan.generic, plan.paths

    check()
