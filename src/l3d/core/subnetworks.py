"""Low-rank subnetwork directions: one CP or Tucker factorisation per decomposed tensor
(Appendix B.1).

A `Subnetworks` module holds n_v directions in the space of the selected parameter tensors. It
never needs the dense (n_v x n_w) matrix: inner products with per-sample gradients, the Gram matrix
and the norms are all contracted from the factors (docs/math.md sections 2 and 4). Every operation
is vectorised over subnetworks; the only Python loop is over the (few) decomposed tensors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
from torch import Tensor, nn

from l3d.errors import L3DError

Factorization = Literal["cp", "tucker"]
# The Gram's matrix products in float32, or with bfloat16 operands (float32 accumulation, products
# rounded to bfloat16, the diagonal kept exact): docs/performance.md, "A bfloat16 Gram".
GramPrecision = Literal["float32", "bfloat16"]

# Axis letters for einsum strings: s = sample, k / l = subnetwork, r / q = CP rank,
# a..h = tensor modes, and per-mode Tucker ranks from the upper-case alphabet.
MODES = "abcdefgh"
TUCKER_K = "ABCDEFGH"
TUCKER_L = "IJKLMNOP"


def total(tensors: Iterable[Tensor]) -> Tensor:
    """The sum of a non-empty iterable of tensors (typed, unlike sum() with its 0 start)."""
    return functools.reduce(operator.add, tensors)


def subnetwork_index(k: object, n_subnetworks: int, what: str = "subnetwork index") -> int:
    """k as an index into n_subnetworks: a Python, numpy or one-element torch integer (an
    argsort's entries); bools, floats and out-of-range values get one line, naming k as `what`
    (a command-line option)."""
    index = None
    if not isinstance(k, bool) and not (isinstance(k, Tensor) and k.dtype == torch.bool):
        with contextlib.suppress(TypeError):
            index = operator.index(k)  # type: ignore[arg-type]
    if index is None:
        raise L3DError(f"{what} {k!r} is not an integer: use ints in 0..{n_subnetworks - 1}")
    if not 0 <= index < n_subnetworks:
        raise L3DError(f"{what} {index} out of range: use ints in 0..{n_subnetworks - 1}")
    return index


def max_rank(shape: tuple[int, ...], factorization: Factorization) -> int:
    """Largest useful rank of a tensor: any tensor is a sum of prod(d)/max(d) rank-1 terms."""
    if factorization == "tucker":
        return max(shape)
    return math.prod(shape) // max(shape)


def _mode_ranks(shape: tuple[int, ...], rank: int, factorization: Factorization) -> list[int]:
    """Each mode's rank in TensorFactors (CP: one rank; Tucker: capped at the mode's size)."""
    rank = min(rank, max_rank(shape, factorization))
    return [rank if factorization == "cp" else min(rank, d) for d in shape]


def factor_numel(
    shape: tuple[int, ...], n_subnetworks: int, rank: int, factorization: Factorization
) -> int:
    """Number of factor entries of n_subnetworks directions in one tensor (as TensorFactors
    allocates them), computed without allocating."""
    work_shape = tuple(shape) or (1,)
    ranks = _mode_ranks(work_shape, rank, factorization)
    core = 0 if factorization == "cp" else math.prod(ranks)
    return n_subnetworks * (core + sum(r * d for r, d in zip(ranks, work_shape)))


# Symmetric products F F^T with at least this many rows multiply only their lower block triangle.
TRIANGLE_MIN = 256
# Entries of one tensor's dense directions that the dense-direction Gram forms at a time: 32 MiB
# in float32, within glibc's reused heap blocks (see structured.CHUNK_ELEMENTS; 1.15-1.4x faster
# than 64 MiB slices on one CPU thread).
DENSE_GRAM_ELEMENTS = 1 << 23


def _symmetric_product(flat: Tensor, n_blocks: int, dtype: torch.dtype) -> Tensor:
    """F F^T, (n, n) in `dtype`, for F (n, d) (bfloat16 operands: see GramPrecision). From
    TRIANGLE_MIN rows on, only the lower triangle of n_blocks x n_blocks blocks is multiplied and
    the rest is its transpose: smaller blocks run below matrix-product speed, the more so the
    longer the rows (measured on one core: 4 blocks for mode Grams, 2 for the dense-direction
    Gram, whose rows are whole tensors)."""
    n = flat.shape[0]
    if n < TRIANGLE_MIN:
        return (flat @ flat.T).to(dtype)
    step = -(-n // n_blocks)
    blocks = flat.split(step)
    p = flat.new_empty(n, n, dtype=dtype)
    for i, fi in enumerate(blocks):
        rows = slice(i * step, i * step + len(fi))
        for j, fj in enumerate(blocks[: i + 1]):
            cols = slice(j * step, j * step + len(fj))
            p[rows, cols] = fi @ fj.T
            if j < i:
                p[cols, rows] = p[rows, cols].T
    return p


def _low(x: Tensor | None, low: bool) -> Tensor | None:
    """x with bfloat16 entries when `low` (the Gram's operands, GramPrecision)."""
    return x.bfloat16() if low and x is not None else x


def flat_gram(flat: Tensor, precision: GramPrecision = "float32") -> Tensor:
    """G = D D^T of dense directions D (n_v, n_w), at `precision` (see `Subnetworks.gram`)."""
    if precision == "float32":
        return flat @ flat.T
    low = flat.bfloat16()
    return with_exact_diagonal((low @ low.T).to(flat.dtype), flat.square().sum(1))


def with_exact_diagonal(gram: Tensor, sq_norms: Tensor) -> Tensor:
    """gram (n_v, n_v) with its diagonal replaced by sq_norms (n_v,), differentiably."""
    return gram - torch.diag_embed(gram.diagonal()) + torch.diag_embed(sq_norms)


def _operands(
    core: Tensor | None, modes: Sequence[Tensor], k: str, rank_letters: str
) -> tuple[list[str], list[Tensor]]:
    """Subscripts and tensors that, contracted, give V (subnetwork axis k, mode axes a, b, ...)
    from CP factors (core None) or a Tucker core and factors."""
    m = len(modes)
    if core is None:
        r = rank_letters[0]
        return [f"{k}{r}{MODES[j]}" for j in range(m)], list(modes)
    subs = [k + rank_letters[:m]] + [f"{k}{rank_letters[j]}{MODES[j]}" for j in range(m)]
    return subs, [core, *modes]


def _dense(core: Tensor | None, modes: Sequence[Tensor]) -> Tensor:
    """The dense directions, (n_v, d_1, ..., d_m), of factors (see `_operands`)."""
    m = len(modes)
    if core is None and m <= 2:
        # The common vector and matrix cases as one sum / bmm: cheaper than einsum dispatch in the
        # hot loop of small problems. (n_v, R, a) -> (n_v, a); (n_v, a, R)(n_v, R, b).
        return modes[0].sum(1) if m == 1 else modes[0].transpose(1, 2) @ modes[1]
    subs, ops = _operands(core, modes, "k", "r" if core is None else TUCKER_K)
    return torch.einsum(",".join(subs) + "->k" + MODES[:m], *ops)


class _ModeGram(torch.autograd.Function):
    """One mode's factor Gram P[k, r, l, q] = f_kr . f_lq, (n_v, R, n_v, R) from f (n_v, R, d);
    with `low`, every product takes bfloat16 operands (P keeps f's dtype).

    P = F F^T with F = f viewed as (n_v R, d) is symmetric, so its backward is one product,
    dF = (dP + dP^T) F, where autograd through the einsum would form one per operand (the mode
    Grams of V_out carry most of a structured step's FLOPs: docs/math.md section 4).
    """

    @staticmethod
    def forward(ctx, f: Tensor, low: bool) -> Tensor:
        f_op = cast(Tensor, _low(f, low))
        ctx.save_for_backward(f_op)
        ctx.dtype = f.dtype
        n_v, rank = f.shape[:2]
        p = _symmetric_product(f_op.reshape(n_v * rank, -1), 4, f.dtype)
        return p.view(n_v, rank, n_v, rank)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (f_op,) = ctx.saved_tensors
        n = f_op.shape[0] * f_op.shape[1]
        grad = grad.reshape(n, n)
        sym = (grad + grad.T).to(f_op.dtype)
        return (sym @ f_op.reshape(n, -1)).to(ctx.dtype).view_as(f_op), None


class _DenseGram(torch.autograd.Function):
    """G = D D^T, (n_v, n_v), through one tensor's dense directions D (n_v, numel), from its core
    (None for CP) and mode factors; with `low`, D is formed and multiplied in bfloat16.

    D restricted to rows i of mode 0 depends on mode 0's factor at i alone (CP and Tucker), so
    D is formed a slice of mode-0 rows at a time, G = sum_slices D_j D_j^T, and at most
    DENSE_GRAM_ELEMENTS entries of D exist at once. None is kept for the backward: each slice is
    formed again there (n_v R numel multiply-adds, against n_v^2 numel for its Gram), and as G is
    symmetric its backward is one product per slice, dD_j = (dG + dG^T) D_j, where autograd
    through D D^T forms one per operand; the slice's materialisation takes dD_j to the factors.
    """

    @staticmethod
    def forward(ctx, low: bool, core: Tensor | None, *modes: Tensor) -> Tensor:
        ctx.dtype = dtype = modes[0].dtype
        core, modes = _low(core, low), tuple(cast(Tensor, _low(f, low)) for f in modes)
        ctx.save_for_backward(core, *modes)
        n_v = modes[0].shape[0]
        gram = modes[0].new_zeros(n_v, n_v, dtype=dtype)
        for rows in _mode0_slices(modes):
            dense = _dense(core, [modes[0][:, :, rows], *modes[1:]])  # (n_v, rows, ...)
            gram += _symmetric_product(dense.flatten(1), 2, dtype)
        return gram

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        core, *modes = ctx.saved_tensors
        sym = (grad + grad.T).to(modes[0].dtype)
        grads = [torch.zeros_like(f, dtype=ctx.dtype) for f in modes]
        core_grad = None if core is None else torch.zeros_like(core, dtype=ctx.dtype)
        for rows in _mode0_slices(modes):
            with torch.enable_grad():
                leaves = [modes[0][:, :, rows].detach().requires_grad_()]
                leaves += [f.detach().requires_grad_() for f in modes[1:]]
                leaf_core = None if core is None else core.detach().requires_grad_()
                dense = _dense(leaf_core, leaves).flatten(1)  # (n_v, slice numel)
            inputs = leaves + ([] if leaf_core is None else [leaf_core])
            parts = torch.autograd.grad(dense, inputs, sym @ dense.detach())
            grads[0][:, :, rows] += parts[0]
            for g, part in zip(grads[1:], parts[1 : len(modes)]):
                g += part
            if core_grad is not None:
                core_grad += parts[-1]
        return (None, core_grad, *grads)


def _mode0_slices(modes: Sequence[Tensor]) -> list[slice]:
    """Slices of mode-0 rows whose dense directions hold at most DENSE_GRAM_ELEMENTS entries."""
    n_v, shape = modes[0].shape[0], [f.shape[2] for f in modes]
    step = _mode0_rows_per_slice(n_v, shape)
    return [slice(i, i + step) for i in range(0, shape[0], step)]


def _mode0_rows_per_slice(n_v: int, shape: Sequence[int]) -> int:
    """Mode-0 rows per slice of a dense-direction Gram: DENSE_GRAM_ELEMENTS entries, at least one
    row."""
    return max(1, DENSE_GRAM_ELEMENTS // (n_v * math.prod(shape[1:])))


def _dense_gram_cheaper(shape: tuple[int, ...], n_v: int, ranks: Sequence[int]) -> bool:
    """Whether a tensor's Gram is cheaper through its dense directions (n_v R numel + n_v^2
    numel multiply-adds) than through mode Grams (n_v^2 R^2 sum(d))."""
    factored = n_v * n_v * sum(r * r * d for r, d in zip(ranks, shape))
    return n_v * (max(ranks) + n_v) * math.prod(shape) < factored


def gram_bytes(
    shape: tuple[int, ...], n_subnetworks: int, rank: int, factorization: Factorization
) -> tuple[int, int]:
    """float32 bytes one tensor's Gram holds during a step, as (kept until the backward,
    transient): the mode Grams (n_v R)^2 that the backward of their product keeps, or, through
    dense directions, nothing kept and one slice of them with its gradient at a time."""
    shape = tuple(shape) or (1,)
    ranks = _mode_ranks(shape, rank, factorization)
    if _dense_gram_cheaper(shape, n_subnetworks, ranks):
        rows = min(shape[0], _mode0_rows_per_slice(n_subnetworks, shape))
        return 0, 2 * 4 * n_subnetworks * rows * math.prod(shape[1:])
    return sum(4 * (n_subnetworks * r) ** 2 for r in ranks), 0


class TensorFactors(nn.Module):
    """The factors of all n_v subnetworks for one parameter tensor."""

    def __init__(
        self,
        shape: tuple[int, ...],
        n_subnetworks: int,
        rank: int,
        factorization: Factorization,
        generator: torch.Generator,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        # A 0-d parameter is handled as a 1-element vector.
        self.work_shape = self.shape or (1,)
        if len(self.work_shape) > len(MODES):
            raise ValueError(f"tensors with more than {len(MODES)} dims are not supported")
        self.factorization = factorization
        self.rank = min(rank, max_rank(self.work_shape, factorization))
        ranks = _mode_ranks(self.work_shape, rank, factorization)
        n_v, m = n_subnetworks, len(self.work_shape)

        def randn(*size: int) -> Tensor:
            return torch.randn(*size, generator=generator, dtype=dtype)

        # (n_v, R_j, d_j) per mode. CP: V_k = sum_r outer_j f_j[k, r]; Tucker: a core
        # (n_v, R_1..R_m) too, V_k = core_k x_1 U_1k ... x_m U_mk.
        self.modes = nn.ParameterList(
            [nn.Parameter(randn(n_v, r, d) / math.sqrt(d)) for r, d in zip(ranks, self.work_shape)]
        )
        self.core = (
            None
            if factorization == "cp"
            else nn.Parameter(randn(n_v, *ranks) / math.sqrt(math.prod(ranks)))
        )
        self._m = m

    def materialize(self) -> Tensor:
        """Dense directions, (n_v, *shape)."""
        dense = _dense(self.core, list(self.modes))
        return dense.reshape(dense.shape[0], *self.shape)

    def inner_dense(self, grads: Tensor) -> Tensor:
        """`inner` as one product of the gradients with the dense directions, (n_s, numel) x
        (numel, n_v): for few subnetworks on a small tensor, where the n_v x numel directions fit
        beside the gradients, 1.2-4x faster than `inner`'s contraction one factor at a time at
        rank > 1 or on a convolution's four modes (64 samples; 64-channel kernels)."""
        if self._m == 1:
            directions = self.materialize()
        else:  # one batched product, V_k = L_k^T M_k: 8-10x faster than einsum on a 3x3 kernel
            L, M = self.split(0)
            directions = L.transpose(1, 2) @ M
        return grads.flatten(1) @ directions.flatten(1).T

    def inner(self, grads: Tensor) -> Tensor:
        """<V_k, g_s> for dense per-sample tensors grads (n_s, *shape) -> (n_s, n_v)."""
        subs, ops = _operands(
            self.core, list(self.modes), "k", "r" if self.core is None else TUCKER_K
        )
        g = grads.reshape(grads.shape[0], *self.work_shape)
        return torch.einsum(f"s{MODES[: self._m]}," + ",".join(subs) + "->sk", g, *ops)

    def gram(self, precision: GramPrecision = "float32") -> Tensor:
        """G_kl = <V_k, V_l> from factors, (n_v, n_v); through the dense directions instead when
        that is cheaper (high rank, small tensor: n_v R numel + n_v^2 numel < n_v^2 R^2 sum(d)).
        With precision "bfloat16" the products take bfloat16 operands (see `Subnetworks.gram`)."""
        low = precision == "bfloat16"
        ranks = [f.shape[1] for f in self.modes]
        if _dense_gram_cheaper(self.work_shape, self.modes[0].shape[0], ranks):
            return cast(Tensor, _DenseGram.apply(low, self.core, *self.modes))
        mats = [cast(Tensor, _ModeGram.apply(f, low)) for f in self.modes]  # (n_v, R, n_v, R)
        if self.core is None:  # the CP Gram is the elementwise product of the mode Grams
            return functools.reduce(operator.mul, mats).sum(dim=(1, 3))
        k_r, l_r = TUCKER_K[: self._m], TUCKER_L[: self._m]
        subs = [f"k{k_r}", f"l{l_r}"] + [f"k{k_r[j]}l{l_r[j]}" for j in range(self._m)]
        return torch.einsum(",".join(subs) + "->kl", self.core, self.core, *mats)

    def sq_norms(self) -> Tensor:
        """||V_k||^2 per subnetwork, (n_v,), without the off-diagonal Gram work."""
        if self.core is None:
            mode_grams = (f @ f.transpose(1, 2) for f in self.modes)  # (n_v, R, R): "kra,kqa->krq"
            return functools.reduce(operator.mul, mode_grams).sum(dim=(1, 2))
        k_r, l_r = TUCKER_K[: self._m], TUCKER_L[: self._m]
        subs = [f"k{k_r}", f"k{l_r}"] + [f"k{k_r[j]}{l_r[j]}" for j in range(self._m)]
        mats = [torch.einsum("kpa,kqa->kpq", f, f) for f in self.modes]
        return torch.einsum(",".join(subs) + "->k", self.core, self.core, *mats)

    def direction(self, k: int) -> Tensor:
        """Subnetwork k's dense tensor, (*shape), without forming the other subnetworks (an
        embedding matrix times n_v may not fit in memory)."""
        modes = MODES[: self._m]
        if self.core is None:
            subs = ",".join(f"r{a}" for a in modes)
            dense = torch.einsum(f"{subs}->{modes}", *[f[k] for f in self.modes])
        else:
            ranks = TUCKER_K[: self._m]
            subs = ranks + "," + ",".join(f"{r}{a}" for r, a in zip(ranks, modes))
            dense = torch.einsum(f"{subs}->{modes}", self.core[k], *[f[k] for f in self.modes])
        return dense.reshape(self.shape)

    def split(self, out_mode: int) -> tuple[Tensor, Tensor]:
        """V_k = sum_r L_kr (x) M_kr with L on the output mode: L (n_v, R', d_out) and
        M (n_v, R', prod of the other dims in tensor order). CP: R' = R and M is the outer product
        of the other modes' factors; Tucker: R' = the output mode's rank, M = core times the
        others. The structured backend contracts L with output-gradients and M with inputs."""
        others = [j for j in range(self._m) if j != out_mode]
        if self.core is None:
            L = self.modes[out_mode]
            if len(others) == 1:
                return L, self.modes[others[0]]
            subs = ",".join(f"kr{MODES[j]}" for j in others)
            M = torch.einsum(
                f"{subs}->kr{''.join(MODES[j] for j in others)}", *[self.modes[j] for j in others]
            )
            return L, M.reshape(M.shape[0], M.shape[1], -1)
        ranks = TUCKER_K[: self._m]
        core_subs = [f"k{ranks}"] + [f"k{ranks[j]}{MODES[j]}" for j in others]
        out = f"k{ranks[out_mode]}{''.join(MODES[j] for j in others)}"
        M = torch.einsum(
            ",".join(core_subs) + "->" + out, self.core, *[self.modes[j] for j in others]
        )
        return self.modes[out_mode], M.reshape(M.shape[0], M.shape[1], -1)

    @torch.no_grad()
    def scale_(self, factor: Tensor) -> None:
        """Multiply subnetwork k's direction in this tensor by factor[k] (V is linear in one
        factor)."""
        target = self.modes[0] if self.core is None else self.core
        target.mul_(factor.reshape(-1, *[1] * (target.dim() - 1)))

    @torch.no_grad()
    def copy_(self, other: TensorFactors) -> None:
        for mine, theirs in zip(self.parameters(), other.parameters()):
            mine.copy_(theirs)


class Subnetworks(nn.Module):
    """n_v low-rank directions over a set of named parameter tensors (V_in or V_out of the
    paper)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        n_subnetworks: int,
        ranks: dict[str, int],
        factorization: Factorization = "cp",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        generator = generator or torch.Generator().manual_seed(0)
        self.names = list(shapes)
        self.n_subnetworks = n_subnetworks
        self.factorization = factorization
        self.tensors = nn.ModuleList(
            TensorFactors(shapes[n], n_subnetworks, ranks[n], factorization, generator, dtype)
            for n in self.names
        )

    @property
    def factors(self) -> list[TensorFactors]:
        """The factors of each decomposed tensor, in `names` order."""
        return cast(list[TensorFactors], list(self.tensors))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in zip(self.names, self.factors)}

    @property
    def ranks(self) -> dict[str, int]:
        """Effective rank per tensor (the requested rank capped at the tensor's largest)."""
        return {n: t.rank for n, t in zip(self.names, self.factors)}

    def materialize(self) -> dict[str, Tensor]:
        """Dense directions {name: (n_v, *shape)}. Costs n_v x n_w memory: for inspection only."""
        return {n: t.materialize() for n, t in zip(self.names, self.factors)}

    @property
    def n_weights(self) -> int:
        """n_w: parameters over all decomposed tensors."""
        return sum(math.prod(t.shape) for t in self.factors)

    def materialize_flat(self) -> Tensor:
        """Dense directions as one (n_v, n_w) matrix, tensors concatenated in `names` order.

        Differentiable; for small n_v x n_w it turns projections and the Gram matrix into single
        matrix products, far fewer kernel launches than the per-tensor contractions.
        """
        return torch.cat([t.materialize().reshape(self.n_subnetworks, -1) for t in self.factors], 1)

    def direction(self, k: int) -> dict[str, Tensor]:
        """Subnetwork k as {name: tensor shaped like the parameter}."""
        if not 0 <= k < self.n_subnetworks:
            raise IndexError(f"subnetwork {k} out of range: there are {self.n_subnetworks}")
        return {n: t.direction(k) for n, t in zip(self.names, self.factors)}

    def inner(self, grads: dict[str, Tensor]) -> Tensor:
        """sum_tensors <V_k, g_s> for dense per-sample gradients {name: (n_s, *shape)} ->
        (n_s, n_v)."""
        return total(t.inner(grads[n]) for n, t in zip(self.names, self.factors))

    def gram(self, precision: GramPrecision = "float32") -> Tensor:
        """G = V V^T, (n_v, n_v), summed over tensors.

        "bfloat16" runs the off-diagonal products with bfloat16 operands and float32
        accumulation, each product rounded to bfloat16 (relative error about 2^-9 per entry, 2x
        faster matrix products where the CPU or GPU has bfloat16 units); the diagonal, which
        carries most of c^T G c, is the exact ||V_k||^2 from `sq_norms`.
        """
        gram = total(t.gram(precision) for t in self.factors)
        return gram if precision == "float32" else with_exact_diagonal(gram, self.sq_norms())

    def sq_norms(self) -> Tensor:
        """Global squared L2 norm of each subnetwork over all its tensors, (n_v,)."""
        return total(t.sq_norms() for t in self.factors)

    @torch.no_grad()
    def normalize_(self, eps: float = 1e-12) -> None:
        """Project each subnetwork onto the unit sphere in the global L2 norm (Section 2.4).

        The authors' code instead rescales with sqrt of the sum of per-tensor norms, whose fixed
        point is not L2 = 1 (docs/authors-code.md); we use the paper's unit vector.
        """
        factor = self.sq_norms().clamp_min(eps).rsqrt()
        # Spread the scale over tensors equally so no tensor's factors shrink towards zero alone:
        # scaling every tensor of subnetwork k by the same factor scales V_k by that factor.
        for t in self.factors:
            t.scale_(factor)

    @torch.no_grad()
    def copy_(self, other: Subnetworks) -> None:
        for mine, theirs in zip(self.factors, other.factors):
            mine.copy_(theirs)

    def random_like(self, seed: int) -> Subnetworks:
        """Unit-norm random directions with these tensors, ranks and factorisation: a baseline
        against which learned subnetworks are judged."""
        generator = torch.Generator().manual_seed(seed)
        baseline = Subnetworks(
            self.shapes, self.n_subnetworks, self.ranks, self.factorization, generator
        )
        baseline.normalize_()
        return baseline.to(next(self.parameters()).device)
