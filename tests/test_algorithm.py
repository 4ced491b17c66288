"""Algorithm 1: batch top-k, the loss identity, unit-norm V_out, optimisation, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import l3d
from l3d.config import L3DConfig
from l3d.core import algorithm, trainer
from l3d.core.algorithm import batch_top_k, losses, n_kept, reconstruction_sq_errors
from l3d.core.subnetworks import Subnetworks
from l3d.decomposition import build, choose_n_subnetworks


@pytest.mark.parametrize("k", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_batch_top_k_keeps_round_k_n_largest(k):
    c = torch.randn(32, 7)
    mask = batch_top_k(c, k)
    assert mask.sum() == max(1, round(k * c.numel())) == n_kept(k, c.numel())
    kept, dropped = c.abs()[mask], c.abs()[~mask]
    if dropped.numel():
        assert kept.min() >= dropped.max()


def test_batch_top_k_is_over_the_whole_batch_not_per_sample():
    c = torch.zeros(4, 5)
    c[0] = torch.tensor([5.0, 4, 3, 2, 1])  # one sample holds all the big coefficients
    mask = batch_top_k(c, 0.25)  # 5 of 20
    assert mask[0].all() and not mask[1:].any()


def test_batch_top_k_with_ties_keeps_exactly_the_count():
    mask = batch_top_k(torch.ones(10, 10), 0.1)
    assert mask.sum() == 10


def test_loss_identity_equals_dense_reconstruction():
    shapes = {"w": (3, 4), "b": (3,)}
    v_out = Subnetworks(shapes, 6, {"w": 2, "b": 1}, "cp", torch.Generator().manual_seed(1))
    v_in = Subnetworks(shapes, 6, {"w": 2, "b": 1}, "cp", torch.Generator().manual_seed(2))
    g = {n: torch.randn(9, *s) for n, s in shapes.items()}
    c, d = v_in.inner(g), v_out.inner(g)
    g_sq = sum(t.flatten(1).pow(2).sum(1) for t in g.values())
    mask = batch_top_k(c, 0.3)
    errors = reconstruction_sq_errors(c, d, g_sq, v_out.gram(), mask)
    dense = v_out.materialize()
    g_hat = {n: torch.einsum("sk,k...->s...", c * mask, dense[n]) for n in shapes}
    explicit = sum((g[n] - g_hat[n]).flatten(1).pow(2).sum(1) for n in shapes)
    torch.testing.assert_close(errors, explicit, rtol=1e-4, atol=1e-5)
    result = losses(errors, g_sq)
    torch.testing.assert_close(result.pooled_squared, explicit.sum() / g_sq.sum())
    torch.testing.assert_close(result.paper, (explicit / g_sq).sqrt().mean(), rtol=1e-4, atol=1e-6)


def test_v_out_has_unit_norm_after_training_steps(mlp):
    d = l3d.decompose(
        mlp,
        torch.randn(64, 4),
        params=["fc1.*", "fc2.weight"],
        n_subnetworks=5,
        rank=2,
        epochs=2,
        progress=False,
    )
    norms = torch.stack(
        [torch.cat([t.flatten() for t in d.v_out(k).values()]).norm() for k in range(5)]
    )
    torch.testing.assert_close(norms, torch.ones(5))


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return x @ self.w.T


def test_loss_goes_to_zero_when_subnetworks_span_the_gradients():
    """top_k = 1 with 6 full-rank subnetworks spans the 6-dim parameter space of a linear model:
    the reconstruction must become (almost) exact, so the optimisation works at all."""
    torch.manual_seed(0)
    d = l3d.decompose(
        Linear(),
        torch.randn(256, 3),
        params=["w"],
        n_subnetworks=6,
        rank=2,
        top_k=1.0,
        epochs=60,
        lr=0.02,
        lr_decay=1.0,
        loss="pooled_squared",
        progress=False,
    )
    assert d.history[0]["loss_pooled_squared"] > 0.05
    assert d.evaluation.loss_pooled_squared < 1e-3


def test_same_seed_same_result_different_seed_different(mlp):
    x = torch.randn(64, 4)
    kw = dict(params=["fc1.weight"], n_subnetworks=4, rank=1, epochs=3, progress=False)
    a = l3d.decompose(mlp, x, seed=5, **kw)
    b = l3d.decompose(mlp, x, seed=5, **kw)
    c = l3d.decompose(mlp, x, seed=6, **kw)
    for k in range(4):
        assert torch.equal(a.v_out(k)["fc1.weight"], b.v_out(k)["fc1.weight"])
    assert a.history == [{**r, "seconds": a.history[i]["seconds"]} for i, r in enumerate(b.history)]
    assert not torch.equal(a.v_out(0)["fc1.weight"], c.v_out(0)["fc1.weight"])


def test_lr_schedule_and_warm_start(mlp):
    x = torch.randn(64, 4)
    d = l3d.decompose(
        mlp,
        x,
        params=["fc1.weight"],
        n_subnetworks=3,
        epochs=4,
        batch_size=16,
        lr_decay=0.5,
        lr_decay_every=1,
        lr_decay_unit="epoch",
        warm_start_epochs=2,
        progress=False,
    )
    assert [r["lr"] for r in d.history] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    assert [r["top_k"] for r in d.history] == [0.999, 0.999, 0.1, 0.1]
    d = l3d.decompose(
        mlp,
        x,
        params=["fc1.weight"],
        n_subnetworks=3,
        epochs=2,
        batch_size=16,
        lr_decay=0.5,
        lr_decay_every=4,
        progress=False,
    )  # 4 steps per epoch
    assert [r["lr"] for r in d.history] == pytest.approx([0.01, 0.005])


def test_matmul_precision_covers_the_training_steps_and_is_restored(mlp, monkeypatch):
    seen = []
    original = algorithm.step_losses

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return original(*args, **kwargs)

    monkeypatch.setattr(algorithm, "step_losses", spy)
    x = torch.randn(64, 4)
    kw = dict(
        params=["fc1.weight", "fc2.weight"],
        n_subnetworks=4,
        rank=2,
        epochs=2,
        gradient_method="structured",
        progress=False,
    )
    before = torch.get_float32_matmul_precision()
    fast = l3d.decompose(mlp, x, matmul_precision="medium", **kw)
    assert seen and set(seen) == {"medium"}
    assert torch.get_float32_matmul_precision() == before
    seen.clear()
    exact = l3d.decompose(mlp, x, **kw)
    assert set(seen) == {"highest"}
    # oneDNN's bf16 mode on AVX512-BF16 agrees to ~1e-6; a backend rounding each operand to
    # bfloat16 once would differ by ~1e-3. Either way the run must be the same run.
    for a, b in zip(fast.history, exact.history):
        assert a["loss_pooled_squared"] == pytest.approx(b["loss_pooled_squared"], rel=2e-2)


def test_matmul_precision_is_restored_when_the_block_raises():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError), trainer.matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
def test_memory_estimate_counts_the_factors_exactly(factorization):
    from l3d.core.algorithm import SubnetworkPair, training_bytes

    shapes = {"a": (6, 4), "b": (6,), "c": (3, 2, 5), "d": ()}
    ranks = {"a": 3, "b": 2, "c": 9, "d": 1}
    pair = SubnetworkPair.initialize(shapes, 7, ranks, factorization, torch.Generator())
    pair_bytes = sum(p.numel() * p.element_size() for p in pair.parameters())
    # Factors, their gradients and AdamW's two moments: four times the pair.
    assert training_bytes(shapes, 7, ranks, factorization) == 4 * pair_bytes


def test_memory_check_names_the_device_that_is_too_small(monkeypatch):
    from l3d import L3DError
    from l3d.core import algorithm

    sizes = {"cuda": 10**6, "cpu": 10**12}
    monkeypatch.setattr(algorithm, "device_memory", lambda device: sizes[device.type])
    shapes, ranks = {"w": (100, 100)}, {"w": 4}
    # 1000 x 4 x 200 floats per set: 3.2 MB; V_in and V_out while training: 4 x 6.4 MB.
    with pytest.raises(L3DError, match=r"needs about 26 MB .*1.0 MB of memory of cuda:0"):
        algorithm.SubnetworkPair.initialize(
            shapes, 1000, ranks, "cp", torch.Generator(), device="cuda:0"
        )
    sizes["cpu"] = 10**6  # the factors are drawn on the CPU first
    sizes["cuda"] = 10**12
    with pytest.raises(L3DError, match=r"of memory of cpu"):
        algorithm.check_memory(shapes, 1000, ranks, "cp", "cuda:0")
    algorithm.check_memory(shapes, 10, ranks, "cp", "cuda:0")


def test_gradient_initialisation_finds_the_directions_of_single_feature_gradients():
    """A linear map without bias, one-hot inputs scaled by a in [0.5, 2] and a zero reference:
    g_i = a^2 (W e_j) e_j^T, so the gradients point along one of 6 known rank-1 directions. The
    gradient initialisation (init='gradients') must give each of them its own subnetwork."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    gen = torch.Generator().manual_seed(1)
    features = torch.randint(0, 6, (120,), generator=gen)
    x = torch.nn.functional.one_hot(features, 6).float() * (
        0.5 + 1.5 * torch.rand(120, 1, generator=gen)
    )
    config = L3DConfig.create(params=["weight"], n_subnetworks=6, init="gradients")
    zero = lambda out, generator: torch.zeros_like(out)  # noqa: E731
    pair = build(model, x, config, reference=zero, progress=False)[2].pair
    with torch.no_grad():
        found = pair.v_out.materialize()["weight"].flatten(1)  # (6, 24)
    truth = torch.stack(
        [torch.outer(model.weight[:, j], torch.eye(6)[j]).flatten() for j in range(6)]
    )
    cos = (
        torch.nn.functional.normalize(found, dim=1) @ torch.nn.functional.normalize(truth, dim=1).T
    )
    assert sorted(cos.abs().argmax(1).tolist()) == list(range(6))
    assert cos.abs().max(1).values.min() > 0.999
    # V_in starts equal to V_out, as with random factors.
    torch.testing.assert_close(pair.v_in.materialize_flat(), pair.v_out.materialize_flat())


@pytest.mark.parametrize("progress", [True, False])
def test_gradient_initialisation_shows_its_stages_when_slow(mlp, monkeypatch, capsys, progress):
    """Sampling the gradients and the k-means (with the swap search) each get a bar, once they
    take a few seconds (here at once); the centres do not depend on the bar."""
    from l3d.core import resampling

    monkeypatch.setattr(resampling, "PROGRESS_DELAY_SECONDS", 0.0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    config = L3DConfig.create(
        params=["fc1.weight"], n_subnetworks=3, init="gradients", init_swap_search=True
    )
    pair = build(mlp, x, config, progress=progress)[2].pair
    err = capsys.readouterr().err
    if progress:
        assert "init: per-sample gradients" in err and "/64 " in err
        assert "init: k-means of 64 gradients" in err and "/3 " in err and "swap search" in err
    else:
        assert "init:" not in err
    other = build(mlp, x, config, progress=not progress)[2].pair
    assert torch.equal(pair.v_out.materialize_flat(), other.v_out.materialize_flat())


def _clusters(sizes: list[int], mixtures: int, d: int = 40, seed: int = 0):
    """Unit rows near len(sizes) directions (sizes[j] rows each, random signs, a little noise),
    orthonormal but the last, which leans towards the one before it (cos 0.29), plus `mixtures`
    rows of the first two directions' sum: the planted directions and the rows (M, d)."""
    gen = torch.Generator().manual_seed(seed)
    planted = torch.linalg.qr(torch.randn(d, len(sizes), generator=gen))[0].T  # (n, d)
    planted[-1] = torch.nn.functional.normalize(planted[-1] + 0.3 * planted[-2], dim=0)
    rows = [planted[j] * torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)
            for j, n in enumerate(sizes)]  # fmt: skip
    rows.append(((planted[0] + planted[1]) / 2**0.5).expand(mixtures, d))
    g = torch.cat(rows) + 0.02 * torch.randn(sum(sizes) + mixtures, d, generator=gen)
    return planted, g / g.norm(dim=1, keepdim=True)


def test_kmeans_swaps_give_a_small_cluster_its_centre():
    """Lloyd steps from a seeding with two centres on the largest cluster leave the 3-row
    cluster, which leans towards a 20-row one, without a centre: its rows join that cluster's
    (checked against the oracle, the planted directions). The swap
    search moves a centre onto it, and every planted direction gets one. Two rows mix the first
    two directions, as samples with two active circuits do."""
    from l3d.core import resampling

    planted, g = _clusters([60, 20, 20, 20, 3], mixtures=2)
    y = resampling._coordinates(g)
    lloyd = resampling._lloyd(y, resampling._one_hot_rows([0, 1, 60, 80, 100], len(y)))

    def found(members):
        centres = members @ g
        cos = (centres / centres.norm(dim=1, keepdim=True)) @ planted.T
        return cos.abs().max(0).values  # best |cos| per planted direction

    assert found(lloyd)[4] < 0.5
    swapped = resampling._swap_search(y, lloyd)
    assert (found(swapped) > 0.98).all()
    assert resampling._kmeans_objective(y, swapped) > resampling._kmeans_objective(y, lloyd)
    for seed in range(5):  # and from k-means++ seeding
        centres = resampling.spherical_kmeans(g, 5, torch.Generator().manual_seed(seed), True)
        assert ((centres @ planted.T).abs().max(0).values > 0.98).all()


def test_kmeans_coordinates_keep_every_dot_product():
    """Clustering on y with y y^T = g g^T is clustering on g: with more columns than rows the
    coordinates are the eigen-coordinates of the rows' Gram matrix (bfloat16 rows: within
    1e-2), else g itself."""
    from l3d.core import resampling

    g = torch.nn.functional.normalize(torch.randn(30, 500, dtype=torch.float64), dim=1).float()
    y = resampling._coordinates(g)
    assert y.shape[1] <= 30
    torch.testing.assert_close(y @ y.T, g @ g.T, atol=1e-2, rtol=0)
    assert torch.equal(resampling._coordinates(g.T[:, :20]), g.T[:, :20])


def test_gradient_initialisation_needs_as_many_nonzero_gradients_as_subnetworks():
    model = nn.Linear(3, 2, bias=False)
    x = torch.zeros(8, 3)
    x[0, 0] = 1.0  # one nonzero gradient against the zero reference
    zero = {"reference": lambda out, generator: torch.zeros_like(out), "progress": False}
    with pytest.raises(l3d.L3DError, match="init='gradients' needs at least n_subnetworks=2"):
        l3d.decompose(model, x, params=["weight"], n_subnetworks=2, epochs=1, init="gradients",
                      **zero)  # fmt: skip
    with pytest.raises(l3d.L3DError, match=r"\(init='gradients'\) found every per-sample gradient"):
        l3d.decompose(model, torch.zeros(8, 3), params=["weight"], n_subnetworks=2, epochs=1,
                      init="gradients", **zero)  # fmt: skip


def _one_hot_gradients(per_feature: list[int]) -> tuple[nn.Module, torch.Tensor]:
    """A bias-free linear map and scaled one-hot inputs, `per_feature[j]` of feature j: with a
    zero reference every gradient lies along one of len(per_feature) orthogonal directions."""
    torch.manual_seed(0)
    model = nn.Linear(len(per_feature), 4, bias=False)
    features = torch.cat([torch.full((n,), j) for j, n in enumerate(per_feature)])
    scale = 0.5 + 1.5 * torch.rand(len(features), 1, generator=torch.Generator().manual_seed(1))
    return model, torch.nn.functional.one_hot(features, len(per_feature)).float() * scale


def test_n_subnetworks_is_chosen_as_twice_the_gradients_participation_ratio():
    """Normalised gradients along 6 orthogonal directions, 20 each: the participation ratio is
    exactly 6, so decompose() without n_subnetworks uses 12. Unbalanced counts (n_j) give
    (Σ n_j)² / Σ n_j², here 60² / 1400 = 2.57 -> 5."""
    zero = lambda out, generator: torch.zeros_like(out)  # noqa: E731
    model, x = _one_hot_gradients([20] * 6)
    d = l3d.decompose(model, x, params=["weight"], epochs=1, reference=zero, progress=False)
    assert d.n_subnetworks == 12 and d.config.n_subnetworks == 12
    model, x = _one_hot_gradients([30, 20, 10])
    config = L3DConfig.create(params=["weight"], n_subnetworks=1)
    assert choose_n_subnetworks(model, x, config, reference=zero) == round(2 * 60**2 / 1400)


def test_the_chosen_n_subnetworks_never_exceeds_the_samples_with_a_gradient():
    """12 samples along 12 orthogonal directions: twice the participation ratio is 24, more
    subnetworks than samples, and decompose()'s own default init='gradients' then refused the run
    ('needs at least n_subnetworks=24 samples')."""
    zero = lambda out, generator: torch.zeros_like(out)  # noqa: E731
    model, x = _one_hot_gradients([1] * 12)
    d = l3d.decompose(model, x, params=["weight"], epochs=1, reference=zero, progress=False)
    assert d.n_subnetworks == 12 and d.config.init == "gradients"


def test_choosing_n_subnetworks_for_a_large_model_asks_for_it():
    model = nn.Linear(1100, 1000, bias=False)  # 1.1 M weights: room for fewer than 64 gradients
    with pytest.raises(l3d.L3DError, match="give n_subnetworks"):
        l3d.decompose(model, torch.randn(8, 1100), params=["weight"], epochs=1, progress=False)


def test_bfloat16_gram_trains_like_float32(mlp, monkeypatch):
    """gram_precision reaches every training step's Gram (structured and dense paths) and the
    run stays the float32 run within bfloat16's rounding; evaluation stays float32."""
    seen = []
    original = algorithm.step_losses

    def spy(*args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs.get("gram_precision"))
        return original(*args, **kwargs)

    monkeypatch.setattr(algorithm, "step_losses", spy)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    for method in ("structured", "vmap"):
        kw = dict(
            params=["fc1.weight", "fc2.weight"],
            n_subnetworks=6,
            rank=2,
            epochs=3,
            gradient_method=method,
            progress=False,
        )
        seen.clear()
        low = l3d.decompose(mlp, x, gram_precision="bfloat16", **kw)
        assert seen and set(seen) == {"bfloat16"}
        exact = l3d.decompose(mlp, x, **kw)
        for a, b in zip(low.history, exact.history):
            assert a["loss_pooled_squared"] != b["loss_pooled_squared"]
            assert a["loss_pooled_squared"] == pytest.approx(b["loss_pooled_squared"], rel=2e-2)


def _saved_bytes(fn, excluded):
    """Bytes of the distinct storages autograd saves while fn() runs, `excluded` tensors' not."""
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize("per_token", [False, True])
def test_step_memory_estimate_matches_what_a_batch_holds(mlp, token_model, per_token):
    """batch_memory's three parts against the real batch of batch_size inputs: its signals'
    bytes, and what autograd saves in its forward and divergence (activations) and in the two
    projections (kept), measured with saved-tensor hooks; the estimate comes from two inputs.
    The estimate of what is kept holds before and after the projections form gradients."""
    from l3d.core.algorithm import SubnetworkPair
    from l3d.core.gradients import GradientSource
    from l3d.core.model import Target
    from l3d.core.samples import Dataset

    if per_token:
        model, params = token_model, ["mix.weight", "head.weight"]
        data = {"input_ids": torch.randint(0, 7, (12, 6), generator=torch.Generator())}
        divergence = "kl"
    else:
        model, params = mlp, ["fc1.weight", "fc2.weight"]
        data, divergence = torch.randn(12, 4), "mse"
    target = Target.create(model, params)
    source = GradientSource(
        target, divergence, "random", per_token=per_token, method="structured",
        dataset=Dataset(data, 12),
    )  # fmt: skip
    ranks = {n: 2 for n in params}
    estimate = source.batch_memory(5, ranks, 12)
    batch = next(source.epoch(torch.Generator()))
    assert estimate.gradients == batch.nbytes()
    signals = [t for parts in batch.matrices.values() for sig in parts for t in (sig.a, sig.delta)]
    assert batch.nbytes() == sum(t.nbytes for t in signals) > 0
    w = {n: p.detach().requires_grad_() for n, p in target.w0.items()}
    weights = [*model.parameters(), *w.values()]
    forward = _saved_bytes(lambda: target.forward(data, w), weights)
    outputs = target.outputs(data)
    y = outputs.flatten(0, 1) if per_token else outputs
    divergence = _saved_bytes(
        lambda: torch.func.vmap(source.divergence.fn)(y.clone().requires_grad_(), y), []
    )
    # The forward's saved tensors, outputs + references + dD/dy, the divergence's twice.
    assert forward > 0 and divergence > 0
    assert estimate.activations == forward + 3 * outputs.nbytes + 2 * divergence
    pair = SubnetworkPair.initialize(target.shapes, 5, ranks, "cp", torch.Generator())
    expected = batch.kept_bytes(5, ranks)
    kept = _saved_bytes(
        lambda: (batch.project(pair.v_in), batch.project(pair.v_out)),
        [*pair.parameters(), *signals],
    )
    # The token model's weights (few positions, tiny weights) have their gradients formed by
    # the projections, which keep them.
    assert batch.formed == ({"mix.weight", "head.weight"} if per_token else set())
    assert estimate.kept == expected == kept > 0
    assert estimate.samples == batch.n_samples and not estimate.dense


def test_memory_check_counts_the_step_and_names_the_batch_options(mlp, monkeypatch):
    """A device with room for the training state but not for one step: the run is refused
    before the subnetworks are allocated, naming the batch-side options."""
    from l3d import L3DError
    from l3d.core import algorithm
    from l3d.decomposition import build

    kw = dict(params=["fc1.weight", "fc2.weight"], n_subnetworks=4, epochs=1)
    x = torch.randn(64, 4)
    lines = []
    build(mlp, x, l3d.L3DConfig.create(**kw), progress=False, log=lines.append)
    assert len(lines) == 1 and "one step adds about" in lines[0]
    shapes = {"fc1.weight": (6, 4), "fc2.weight": (3, 6)}
    state = algorithm.training_bytes(shapes, 4, {n: 1 for n in shapes}, "cp")
    monkeypatch.setattr(algorithm, "device_memory", lambda device: state + 1)
    with pytest.raises(L3DError, match=r"one training step needs about .* reduce batch_size"):
        l3d.decompose(mlp, x, progress=False, **kw)


def test_decompose_shows_the_memory_estimate_with_progress(mlp, capsys):
    kw = dict(params=["fc1.weight"], n_subnetworks=3, epochs=1)
    l3d.decompose(mlp, torch.randn(32, 4), progress=True, **kw)
    assert "; one step adds about " in capsys.readouterr().err
    l3d.decompose(mlp, torch.randn(32, 4), progress=False, **kw)
    assert "one step adds" not in capsys.readouterr().err
