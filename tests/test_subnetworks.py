"""CP / Tucker materialisation, contractions, Gram matrix and unit-norm projection against
formulas."""

from __future__ import annotations

import itertools

import pytest
import torch

from l3d.core.subnetworks import Subnetworks, max_rank

SHAPES = {"w": (3, 4), "conv": (2, 3, 2, 2), "b": (5,)}


def make(factorization, rank=2, n_v=4):
    return Subnetworks(
        SHAPES, n_v, {n: rank for n in SHAPES}, factorization, torch.Generator().manual_seed(0)
    )


def cp_formula(t, k):
    """sum_r a_r (x) b_r (x) c_r ... by explicit outer products (eq. 14)."""
    out = 0
    for r in range(t.rank):
        term = t.modes[0][k, r]
        for f in t.modes[1:]:
            term = torch.tensordot(term, f[k, r], dims=0)
        out = out + term
    return out


def tucker_formula(t, k):
    out = 0
    ranks = t.core.shape[1:]
    for idx in itertools.product(*[range(r) for r in ranks]):
        term = t.core[(k, *idx)]
        vec = t.modes[0][k, idx[0]]
        for j, f in enumerate(t.modes[1:], start=1):
            vec = torch.tensordot(vec, f[k, idx[j]], dims=0)
        out = out + term * vec
    return out


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
def test_materialize_equals_formula(factorization):
    s = make(factorization)
    dense = s.materialize()
    formula = cp_formula if factorization == "cp" else tucker_formula
    for name, t in zip(s.names, s.tensors):
        for k in range(s.n_subnetworks):
            torch.testing.assert_close(dense[name][k], formula(t, k).reshape(SHAPES[name]))


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
def test_contractions_equal_dense(factorization):
    s = make(factorization, rank=3)
    dense = s.materialize()
    grads = {n: torch.randn(7, *shape) for n, shape in SHAPES.items()}
    flat_v = torch.cat([dense[n].flatten(1) for n in s.names], 1)  # (n_v, n_w)
    flat_g = torch.cat([grads[n].flatten(1) for n in s.names], 1)  # (n_s, n_w)
    torch.testing.assert_close(s.inner(grads), flat_g @ flat_v.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.gram(), flat_v @ flat_v.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.sq_norms(), flat_v.pow(2).sum(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
def test_inner_dense_and_its_gradient_equal_the_formula(factorization):
    """The one-product projection (per-sample gradients formed from a structured signal) equals
    the explicit sum_k <V_k, g_s> of eq. 14's directions, values and factor gradients."""
    s = make(factorization, rank=3)
    for name, t in zip(s.names, s.tensors):
        grads = torch.randn(7, *SHAPES[name], dtype=torch.float64)
        t = t.double()
        formula = cp_formula if factorization == "cp" else tucker_formula
        oracle = torch.stack(
            [(grads * formula(t, k).reshape(SHAPES[name])).flatten(1).sum(1) for k in range(4)],
            1,
        )
        fast = t.inner_dense(grads)
        torch.testing.assert_close(fast, oracle)
        weights = torch.randn_like(oracle)
        params = list(t.parameters())
        for g_fast, g_oracle in zip(
            torch.autograd.grad((fast * weights).sum(), params),
            torch.autograd.grad((oracle * weights).sum(), params),
        ):
            torch.testing.assert_close(g_fast, g_oracle)


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
def test_normalize_gives_unit_global_norm(factorization):
    s = make(factorization)
    s.normalize_()
    dense = s.materialize()
    norms = torch.cat([dense[n].flatten(1) for n in s.names], 1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(s.n_subnetworks))


def test_rank_is_capped_at_the_largest_useful_rank():
    s = Subnetworks({"w": (3, 4), "b": (5,)}, 2, {"w": 10, "b": 10}, "cp")
    assert s.ranks == {"w": 3, "b": 1}
    assert max_rank((2, 3, 4), "cp") == 6
    t = Subnetworks({"w": (3, 4)}, 2, {"w": 10}, "tucker")
    assert t.tensors[0].core.shape == (2, 3, 4)


def test_direction_is_shaped_like_the_parameter_and_checks_range():
    s = make("cp")
    v = s.direction(1)
    assert {n: tuple(t.shape) for n, t in v.items()} == SHAPES
    with pytest.raises(IndexError, match="out of range"):
        s.direction(4)


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
@pytest.mark.parametrize("triangle_min", [1, 10**9])
@pytest.mark.parametrize("slice_elements", [1, 1 << 24])
def test_gram_and_its_gradient_equal_dense(
    factorization, triangle_min, slice_elements, monkeypatch
):
    """The factor Gram (mode Grams, or dense directions formed a slice of mode-0 rows at a time;
    block triangle or one product) and its own backward ((dG + dG^T) D, D formed again) equal
    autograd through the plain formula V V^T in float64, for a non-symmetric upstream gradient
    too."""
    import l3d.core.subnetworks

    monkeypatch.setattr(l3d.core.subnetworks, "TRIANGLE_MIN", triangle_min)
    monkeypatch.setattr(l3d.core.subnetworks, "DENSE_GRAM_ELEMENTS", slice_elements)
    # 15 rows (n_v R): uneven triangle blocks of 4, 4, 4, 3. "w" and "conv" take the dense
    # directions, the vector "b" its mode Gram.
    s = Subnetworks(
        SHAPES,
        5,
        {n: 3 for n in SHAPES},
        factorization,
        torch.Generator().manual_seed(0),
        torch.float64,
    )
    weights = torch.randn(
        s.n_subnetworks,
        s.n_subnetworks,
        generator=torch.Generator().manual_seed(2),
        dtype=torch.float64,
    )
    params = list(s.parameters())
    gram = s.gram()
    fast = torch.autograd.grad((gram * weights).sum(), params)
    flat_v = torch.cat([d.flatten(1) for d in s.materialize().values()], 1)
    torch.testing.assert_close(gram, flat_v @ flat_v.T)
    dense = torch.autograd.grad((flat_v @ flat_v.T * weights).sum(), params)
    for gf, gd in zip(fast, dense):
        torch.testing.assert_close(gf, gd)


@pytest.mark.parametrize("tucker", [False, True])
def test_gram_functions_gradcheck(tucker, monkeypatch):
    """The Grams' hand-written backwards against finite differences (float64): the mode Gram with
    its block triangle, the dense-direction Gram in slices of one mode-0 row."""
    import l3d.core.subnetworks as subnetworks

    monkeypatch.setattr(subnetworks, "TRIANGLE_MIN", 1)
    monkeypatch.setattr(subnetworks, "DENSE_GRAM_ELEMENTS", 1)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    modes = [randn(3, 2, 4), randn(3, 2, 3), randn(3, 2, 2)]
    core = randn(3, 2, 2, 2) if tucker else None
    assert torch.autograd.gradcheck(subnetworks._ModeGram.apply, (modes[0], False))
    assert torch.autograd.gradcheck(subnetworks._DenseGram.apply, (False, core, *modes))


def test_one_direction_from_factors_equals_the_materialised_subnetwork():
    """Oracle: materialize(), which forms every subnetwork at once."""
    shapes = {"w": (3, 4), "b": (4,), "k": (2, 3, 2)}
    for factorization in ("cp", "tucker"):
        subnetworks = Subnetworks(shapes, 5, {"w": 2, "b": 1, "k": 2}, factorization)
        dense = subnetworks.materialize()
        for k in range(5):
            for name, d in subnetworks.direction(k).items():
                torch.testing.assert_close(d, dense[name][k])


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
@pytest.mark.parametrize("triangle_min", [1, 10**9])
def test_bfloat16_gram_is_close_with_an_exact_diagonal(factorization, triangle_min, monkeypatch):
    """gram("bfloat16") against float64 V V^T: the diagonal exact, off-diagonal entries and the
    factor gradients within bfloat16's rounding (2^-8 relative) but not equal to float32's (the
    products did run in bfloat16). Both Gram routes: dense directions ("w", "conv") and mode
    Grams ("b"); blocks of the triangle product too."""
    import l3d.core.subnetworks

    monkeypatch.setattr(l3d.core.subnetworks, "TRIANGLE_MIN", triangle_min)
    s = Subnetworks(
        {"w": (16, 24), "conv": (4, 6, 3, 3), "b": (40,)},
        6,
        {"w": 3, "conv": 3, "b": 1},
        factorization,
        torch.Generator().manual_seed(0),
    )
    s.normalize_()
    weights = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    params = list(s.parameters())
    flat_v = torch.cat([d.flatten(1) for d in s.materialize().values()], 1).double()
    exact = flat_v @ flat_v.T
    exact_grads = torch.autograd.grad((exact * weights.double()).sum(), params)
    for route in ("factors", "flat"):
        if route == "factors":
            low = s.gram("bfloat16")
        else:
            low = l3d.core.subnetworks.flat_gram(
                torch.cat([d.flatten(1) for d in s.materialize().values()], 1), "bfloat16"
            )
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.diagonal().double(), exact.diagonal(), rtol=1e-5, atol=1e-6)
        error = (low.double() - exact).abs().max().item()
        assert 0 < error < 2**-7
        grads = torch.autograd.grad((low * weights).sum(), params)
        for g, e in zip(grads, exact_grads):
            assert g.dtype == torch.float32
            rel = ((g.double() - e).norm() / e.norm()).item()
            assert 0 < rel < 2e-2
