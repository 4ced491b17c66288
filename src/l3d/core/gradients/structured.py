"""Structured per-sample gradients: L3D without materialising the (samples x parameters) array.

For the layers that hold almost all weights, one sample's gradient is a sum of outer products of
the layer's input a_s and output-gradient delta_s over the positions s it is applied at
(docs/math.md section 1): Linear and GPT-2 Conv1D (s = tokens), Conv1d-3d (s = output
positions, a_s the unfolded input patch, per group), their transposes (s = input positions, the
roles of input and output-gradient swapped), Embedding (a_s the one-hot token); a weight
tied between such modules has the sum of their signals. So the coefficients
<V_k, g_i> = sum_s sum_r (L_kr . delta_is)(M_kr . a_is) come from the factors directly (section 2),
with V_k = sum_r L_kr (x) M_kr split into its output-side factor L and the rest M. Bias and
norm vectors are small: their per-sample gradients are formed exactly (sum_s delta_s, and
sum_s delta_s * xhat_s). Where a weight's per-sample gradients are cheaper to project once formed
(`_dense_cheaper`), they are formed instead; a convolution's by one weight-gradient of it with
every sample its own groups (docs/math.md section 1), without unfolding patches. Any other
tensor takes the generic torch.func path (torchfunc.py); which path each tensor takes is logged
and kept in `StructuredPlan.paths`.

The signals come from one forward with hooks and one backward of sum_i D_i (samples do not
interact in eval mode). Per-token samples are different: token t's divergence reaches every
position s <= t, so delta^(t) needs its own backward. The backward is batched over tokens
(is_grads_batched) and starts at the input of the output head when the model exposes one
(`get_output_embeddings`): the head acts on each position separately, so one ordinary backward
through it gives every token's cotangent, and only the cheap part below it runs once per token.
A decomposed head's own per-token signal is read off that backward: its output cotangent and its
input at token t alone (`_MatrixSignal.tokens`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from l3d.core.divergences import DivergenceFn, check_references
from l3d.core.gradients.batch import check_finite_gradients, sample_index, to_rows
from l3d.core.gradients.torchfunc import PerSample
from l3d.core.model import Target, is_hf_conv1d, shared_parameters
from l3d.core.samples import Inputs, SampleRows
from l3d.core.subnetworks import Subnetworks, TensorFactors, max_rank, total

logger = logging.getLogger(__name__)

# Tokens per batched backward in per-token mode when chunk_size is not set: bounds the memory of
# the (tokens, *activation) cotangents.
DEFAULT_TOKEN_CHUNK = 32
# Largest intermediate (elements) of a projection: larger batches are contracted in chunks of
# sequences, so memory stays bounded whatever the batch size. 32 MiB in float32: glibc serves
# blocks up to its largest mmap threshold (32 MiB) from reused heap memory, larger ones are mapped
# and page-faulted afresh on every step (1.5x slower projections of 1024 x 256 weights, one thread).
CHUNK_ELEMENTS = 1 << 23


# Which tensors can take the structured path ------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """One supported module whose tensors are decomposed."""

    module_name: str
    module: nn.Module
    kind: str  # linear, gpt2_conv1d, conv1d, conv2d, embedding or a norm (`_kind`)
    tensors: dict[str, str]  # local parameter name ('weight', 'bias') -> full name


_CONV_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "conv1d"),
    (nn.Conv2d, "conv2d"),
    (nn.Conv3d, "conv3d"),
    (nn.ConvTranspose1d, "conv_transpose1d"),
    (nn.ConvTranspose2d, "conv_transpose2d"),
    (nn.ConvTranspose3d, "conv_transpose3d"),
)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "gpt2_conv1d"
    for conv, kind in _CONV_KINDS:
        if isinstance(module, conv):
            return kind
    if isinstance(module, nn.Embedding):
        return None if module.max_norm is not None or module.scale_grad_by_freq else "embedding"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # In eval mode (as every forward here runs, `evaluating`) a fixed affine map per channel
        # from its running statistics: samples do not interact. One without running statistics
        # normalises over the batch, and is refused (`check_independent_samples`).
        return "batchnorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.affine:
        # Each sample's channels by their own statistics, or (track_running_stats, eval mode)
        # by fitted ones: a per-sample affine map either way.
        return "instancenorm"
    if type(module).__name__.endswith("RMSNorm") and isinstance(
        getattr(module, "weight", None), nn.Parameter
    ):
        # torch's and transformers' (Llama, Qwen, Mistral, Gemma's 1 + weight): the weight's
        # gradient is sum_s delta_s * xhat_s alike. A variant computing otherwise fails
        # `_check_uses` and takes the generic path.
        return "rmsnorm"
    return None


def _unsupported(module: nn.Module | None) -> str:
    """Why a decomposed tensor's module takes the generic path, for `StructuredPlan.paths`."""
    if module is None:
        return "root not supported"
    what = type(module).__name__
    if isinstance(module, nn.Embedding):
        return f"{what} with max_norm or scale_grad_by_freq"
    return f"{what} not supported"


GENERIC = "generic torch.func"
"""How `StructuredPlan.paths` names the generic path."""


@dataclass
class StructuredPlan:
    """How each decomposed tensor's per-sample gradients are obtained."""

    sites: list[_Site]
    generic: list[str]
    paths: dict[str, str] = field(default_factory=dict)
    """{tensor name: 'structured (<layer kind>)' or 'generic torch.func (<reason>)'}."""
    uses_checked: bool = False
    """Whether `_check_uses` has compared the calls' gradient with autograd's (first batch)."""
    rows_checked: bool = False
    """... and one sample's row with it (the first batch of several samples)."""
    copied: set[str] = field(default_factory=set)
    """Modules whose output the forward changes in place, passed on as a copy (`_record`)."""
    per_sample: PerSample = field(default_factory=PerSample)
    """How the generic tensors' gradients run the model per sample: vmap, or one at a time."""

    def demote(self, site: _Site, reason: str, names: list[str] | None = None) -> None:
        """Send a site's tensors (those in `names`, default all) to the generic path from now
        on, from every site holding them (a tied weight has one per module); a site left
        without tensors is no longer hooked."""
        chosen = list(site.tensors.values()) if names is None else names
        for name in dict.fromkeys(chosen):
            if name in self.generic:
                continue
            for holder in list(self.sites):
                for local, held in list(holder.tensors.items()):
                    if held == name:
                        del holder.tensors[local]
                if not holder.tensors:
                    self.sites.remove(holder)
            self.generic.append(name)
            self.paths[name] = f"{GENERIC} ({reason})"
            logger.info("L3D gradient path of %s: %s (%s)", name, GENERIC, reason)

    def say_one_sample_at_a_time(self) -> None:
        """Name in `paths` why the generic tensors' gradients now run one sample at a time
        (`per_sample`)."""
        for name in self.generic:
            reason = self.paths[name].removeprefix(f"{GENERIC} (")[:-1]
            self.paths[name] = (
                f"{GENERIC}, one sample at a time ({reason}; {self.per_sample.reason})"
            )

    @classmethod
    def create(cls, target: Target, force_generic: bool = False) -> StructuredPlan:
        model = target.model
        modules = dict(model.named_modules())
        shared = shared_parameters(model)
        params = dict(model.named_parameters())
        by_module: dict[str, _Site] = {}
        generic, paths = [], {}
        for name in target.names:
            module_name, _, local = name.rpartition(".")
            module = modules.get(module_name)
            kind = None if module is None else _kind(module)
            reason = None
            holders: list[tuple[str, nn.Module, str | None]] = []
            if force_generic:
                reason = "forced"
            elif kind is None:
                reason = _unsupported(module)
            elif local not in ("weight", "bias"):
                reason = f"parameter '{local}' of {type(module).__name__}"
            elif id(params[name]) in shared:
                # A tied weight (a token embedding and the head) gets gradient from each module
                # holding it: the sum of their signals, where every holder is a 2-d weight's
                # layer (a tied Conv2d or norm vector takes the generic path).
                holders = _holders(model, params[name])
                if local != "weight" or any(k not in TIED_KINDS for _, _, k in holders):
                    reason = "tied to another module's parameter"
            if module is None or kind is None or reason is not None:
                generic.append(name)
                paths[name] = f"{GENERIC} ({reason or 'not supported'})"
                continue
            for holder_name, holder, holder_kind in holders or [(module_name, module, kind)]:
                site = by_module.setdefault(
                    holder_name, _Site(holder_name, holder, cast(str, holder_kind), {})
                )
                site.tensors[local] = name
            paths[name] = f"structured ({' + '.join(str(k) for _, _, k in holders) or kind})"
        plan = cls(list(by_module.values()), generic, paths)
        logger.info("L3D gradient paths: %s", "; ".join(f"{n}: {p}" for n, p in plan.paths.items()))
        return plan


TRANSPOSED = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
CONVS = ("conv1d", "conv2d", "conv3d", *TRANSPOSED)

TIED_KINDS = ("linear", "gpt2_conv1d", "embedding")
"""Layers a tied weight may be held by on the structured path: 2-d weights without groups, whose
signals' cross terms `_cross_matrix` forms."""


def _holders(model: nn.Module, param: nn.Parameter) -> list[tuple[str, nn.Module, str | None]]:
    """(module name, module, kind) of every module holding `param` as its 'weight'; a holder
    under another local name has kind None."""
    found = []
    for name, module in model.named_modules():
        for local, p in module._parameters.items():
            if p is param:
                found.append((name, module, _kind(module) if local == "weight" else None))
    return found


# Captured signals per module ---------------------------------------------------------------


class _Dims(NamedTuple):
    """A matrix signal's sizes: delta (T, n, S, G, out_g), a (n, S, G, in_g)."""

    t: int
    n: int
    s: int
    g: int
    out_g: int
    in_g: int


@dataclass
class _MatrixSignal:
    """A weight's per-sample gradient as sum_s sum_g delta_{s,g} (x) a_{s,g} (g = conv group).

    delta: (T, n, S, G, out_g); a: (n, S, G, in_g) floats, or token ids (n, S) for an embedding.
    T is the number of per-token samples per sequence (1 without per_token).
    out_mode: which mode of the parameter tensor is the layer's output side.
    tokens: 0, or T for the output head's per-token signal: token t's gradient is its own
    position's delta (x) a only, so the signal holds T x n one-position pseudo-samples, t-major:
    delta (1, T n, 1, 1, out), a (T n, 1, 1, in); results are reshaped to (T, n, ...).
    """

    delta: Tensor
    a: Tensor
    out_mode: int
    shape: tuple[int, ...]
    """The weight's shape."""
    groups: int = 1
    tokens: int = 0

    @property
    def is_embedding(self) -> bool:
        return not self.a.is_floating_point()

    @property
    def dims(self) -> _Dims | None:
        """Its sizes, None for the signals never formed (an embedding's, a head's per token)."""
        if self.is_embedding or self.tokens:
            return None
        t, n, s, g, out_g = self.delta.shape
        return _Dims(t, n, s, g, out_g, self.a.shape[-1])


def _unflat(x: Tensor, sig: _MatrixSignal) -> Tensor:
    """A result over a head signal's (1, T n, ...) pseudo-samples as (T, n, ...)."""
    return x.reshape(sig.tokens, -1, *x.shape[2:]) if sig.tokens else x


def _as_positions(x: Tensor, batch: int, features: int) -> Tensor:
    """(batch, ..., features) -> (batch, S, features)."""
    return x.reshape(batch, -1, features)


def _channels_last(x: Tensor, batch: int, lead: int) -> Tensor:
    """(*L, rows, C, *spatial) -> (*L, batch, S, C) with `lead` axes L kept: a BatchNorm's
    channel axis (1) last, each sample's positions (rows per sample x spatial) in S."""
    c = x.shape[lead + 1]
    y = x.reshape(*x.shape[:lead], batch, -1, c, math.prod(x.shape[lead + 2 :]))
    return y.transpose(-1, -2).reshape(*x.shape[:lead], batch, -1, c)


def _padded(
    module: nn.Conv2d | nn.Conv3d, x: Tensor, explicit: bool = False
) -> tuple[Tensor, tuple[int, ...]]:
    """x padded as the layer's own forward pads, and the zero padding left to the convolution
    (none when `explicit`): 'same' (one more at the end where the kernel's extent is even) and
    reflect / replicate / circular are explicit F.pad amounts."""
    padding = module.padding
    if explicit or isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        return x, (0,) * len(module.kernel_size)
    return x, padding


def _conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Unfolded input patches, (n, L, G, in_g * kh * kw), matching weight.view(out, -1)'s order.
    A Conv1d's as a Conv2d's of height 1 (kernel, stride, ... (1, k)); a Conv3d's by
    `_patches_3d`. A transposed convolution's: those of the convolution it is the adjoint of,
    applied to x."""
    module = cast(nn.Conv2d, module)
    n = x.shape[0]
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        return _patches_3d(cast(nn.Conv3d, module), x)
    flat = isinstance(module, (nn.Conv1d, nn.ConvTranspose1d))
    x, padding = _padded(module, x)
    geometry = [
        (unit, *p) if flat else p
        for unit, p in zip(
            (1, 1, 0, 1), (module.kernel_size, module.dilation, padding, module.stride)
        )
    ]
    cols = F.unfold(
        x.unsqueeze(2) if flat else x,
        cast(tuple[int, int], geometry[0]),
        dilation=cast(tuple[int, int], geometry[1]),
        padding=cast(tuple[int, int], geometry[2]),
        stride=cast(tuple[int, int], geometry[3]),
    )  # (n, C * kh * kw, L), channel-major
    g = module.groups
    return cols.view(n, g, -1, cols.shape[-1]).permute(0, 3, 1, 2)


def _patches_3d(module: nn.Conv3d, x: Tensor) -> Tensor:
    """`_conv_patches` of a Conv3d, whose input F.unfold (4-d only) does not take: padded as the
    layer pads, then a window along each spatial axis (Tensor.unfold over the dilated extent,
    every dilation-th entry kept)."""
    x, _ = _padded(module, x, explicit=True)  # Tensor.unfold does not pad
    for axis, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)[..., ::d]  # the window's axis last
    n, c, depth, height, width = x.shape[:5]
    cols = x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(n, depth * height * width, c, -1)
    return cols.reshape(n, cols.shape[1], module.groups, -1)  # channel-major, as the weight


def _transposed_patches(module: nn.Module, cot: Tensor, spatial: torch.Size) -> Tensor:
    """A transposed convolution's output-gradient patches at its input's positions,
    (n, L, G, out_g * kh * kw): the adjoint convolution's unfolded patches of `cot`, less the
    positions past the input's `spatial` size (where output_padding reaches past the stride, the
    output has rows the adjoint maps there; no input reads them)."""
    conv = cast(nn.ConvTranspose2d, module)
    patches = _conv_patches(conv, cot)  # (n, L', G, ...) over the adjoint's output positions
    padding = cast(tuple[int, ...], conv.padding)  # a transposed convolution's is numbers
    reach = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(
            cot.shape[2:], conv.kernel_size, conv.stride, padding, conv.dilation
        )
    ]
    if reach == list(spatial):
        return patches
    grid = patches.view(patches.shape[0], *reach, *patches.shape[2:])
    index = (slice(None), *(slice(0, size) for size in spatial))
    return grid[index].reshape(patches.shape[0], -1, *patches.shape[2:])


def _conv_dims(module: nn.Module, uses: list[tuple[Tensor, Tensor]]) -> _Dims:
    """The sizes of a convolution's signal over its calls (input x, output-gradient
    (T, n, out, *spatial)), without unfolding the patches: a transposed convolution's positions
    are its input's, where its input plays the output-gradient's part (`_signals`)."""
    conv = cast(nn.Conv2d, module)
    t, n = uses[0][1].shape[:2]
    g, kernel = conv.groups, math.prod(conv.kernel_size)
    if conv.transposed:
        positions = sum(math.prod(x.shape[2:]) for x, _ in uses)
        return _Dims(t, n, positions, g, conv.in_channels // g, conv.out_channels // g * kernel)
    positions = sum(math.prod(d.shape[3:]) for _, d in uses)
    return _Dims(t, n, positions, g, conv.out_channels // g, conv.in_channels // g * kernel)


def _conv_weight_gradients(module: nn.Module, uses: list[tuple[Tensor, Tensor]]) -> Tensor:
    """A convolution's per-sample weight gradients, (1, n, *weight.shape), summed over its calls
    (input x, output-gradient (1, n, out, *spatial)): each call's by one weight-gradient of the
    convolution (or transposed convolution) with every sample its own groups, no patches
    unfolded (faster than the patches' product, `benchmarks/bench_formed.py`, and without their
    memory: a 3 x 3 kernel's patches are nine times its input)."""
    conv = cast(nn.Conv2d, module)
    shape = conv.weight.shape

    def one(x: Tensor, delta: Tensor) -> Tensor:
        n = x.shape[0]
        x, padding = (x, conv.padding) if conv.transposed else _padded(conv, x)
        # Only the weight's shape is read: n copies of it, one per sample's groups.
        weight = delta.new_empty(1).expand(n * shape[0], *shape[1:])
        grads = torch.ops.aten.convolution_backward(
            delta[0].reshape(1, -1, *delta.shape[3:]),
            x.reshape(1, -1, *x.shape[2:]),  # (1, n C_in, *spatial): sample-major channels
            weight,
            None,
            conv.stride,
            padding,
            conv.dilation,
            conv.transposed,
            conv.output_padding,
            n * conv.groups,
            (False, True, False),
        )[1]
        return grads.view(1, n, *shape)

    # cuDNN runs float32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32);
    # these are L3D's own products, which follow its matmul precision ('highest': IEEE float32).
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    try:
        return total(one(x, d) for x, d in uses)
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def _conv_delta(module: nn.Module, delta: Tensor) -> Tensor:
    """(T, n, out, *spatial) -> (T, n, L, G, out_g)."""
    t, n, out = delta.shape[:3]
    g = cast(nn.Conv2d, module).groups
    return delta.reshape(t, n, g, out // g, -1).permute(0, 1, 4, 2, 3)


# Factor algebra ----------------------------------------------------------------------------


class _TokenProjection(torch.autograd.Function):
    """<V_k, g_(t,i)> = sum_s delta^(t)_s . (V_k a_s), (T, n, K), for one layer with per-token
    samples, from L (K, R, out), q = M a (K, R, n S) and delta (T, n, S out), a constant.

    w_k,s = V_k a_s = sum_r L_kr q_kr,s, (K, n S, out), is shared by the T token samples of a
    sequence and is the only large intermediate. Every product is a (batched) matrix product on
    strided views of the operands in their own layout, so neither direction makes permuted copies
    of w or of its gradient (as einsum would), and w is not kept for the backward: the factor
    gradients need dw_k,s = sum_t dout_t,k delta^(t)_s, formed once in the layout both read.
    """

    @staticmethod
    def forward(ctx, L: Tensor, q: Tensor, delta: Tensor) -> Tensor:
        k, (n, s_out) = L.shape[0], delta.shape[1:]
        ctx.save_for_backward(L, q, delta)
        w = torch.bmm(q.transpose(1, 2), L)  # (K, n S, out)
        # Per sequence (T, S out) x (S out, K), batched over sequences.
        by_sequence = torch.bmm(delta.transpose(0, 1), w.view(k, n, s_out).permute(1, 2, 0))
        return by_sequence.transpose(0, 1)  # (T, n, K)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        L, q, delta = ctx.saved_tensors
        (k, _, out), (n, s_out) = L.shape, delta.shape[1:]
        # dw (K, n, S out): each sequence's (K, T) x (T, S out) product written in place.
        grad_w = grad.new_empty(k, n, s_out)
        torch.bmm(grad.permute(1, 2, 0), delta.transpose(0, 1), out=grad_w.transpose(0, 1))
        grad_w = grad_w.view(k, -1, out)  # (K, n S, out)
        return torch.bmm(q, grad_w), torch.bmm(L, grad_w.transpose(1, 2)), None


def _delta_first(t: int, r: int) -> bool:
    """Whether `_project_matrix` contracts delta_s . L_kr first: as cheap as the other order when
    T or R is 1, and smaller."""
    return t == 1 or r == 1


def _project_matrix(sig: _MatrixSignal, tf: TensorFactors) -> Tensor:
    """<V_k, g_(t,i)>, (T, n, n_v), from a, delta and the factors (docs/math.md section 2).
    Sequences are processed in chunks so that no intermediate exceeds CHUNK_ELEMENTS."""
    return _unflat(_project_flat(sig, tf), sig)


def _project_flat(sig: _MatrixSignal, tf: TensorFactors) -> Tensor:
    L, M = tf.split(sig.out_mode)  # (K, R, out), (K, R, in)
    k, r = L.shape[:2]
    L = L.reshape(k, r, sig.groups, -1)  # (K, R, G, out_g)
    t, n, s, g, out_g = sig.delta.shape
    delta_first = _delta_first(t, r)
    per_sequence = s * g * k * (t * r + r if delta_first else out_g + r)
    parts = []
    for i in _chunks(n, per_sequence):
        a, delta = sig.a[i], sig.delta[:, i]
        n_i = delta.shape[1]
        # q = M_kr . a_s, (K, R, n, S, G). Factor rows times signal columns: every product here
        # and in the backward then reads and writes the factors in their own layout.
        if sig.is_embedding:
            q = M.index_select(2, a.flatten()).view(k, r, n_i, s, 1)  # M_kr[token]
        else:
            q = (M.reshape(k * r, -1) @ a.reshape(-1, a.shape[-1]).T).view(k, r, n_i, s, g)
        if delta_first:
            if g == 1:
                p = (L.reshape(k * r, out_g) @ delta.reshape(-1, out_g).T).view(k, r, t, n_i, s, 1)
            else:
                p = torch.einsum("tnsgo,krgo->krtnsg", delta, L)
            # A product and a sum over (R, S, G): as one einsum this is a batch of (n K) tiny
            # matrix products. (K, T, n) -> (T, n, K).
            parts.append((p * q.unsqueeze(2)).sum(dim=(1, 4, 5)).permute(1, 2, 0))
        else:
            # Groups are independent terms of the sum over (s, g): one projection each.
            parts.append(
                total(
                    cast(
                        Tensor,
                        _TokenProjection.apply(
                            L[:, :, j],
                            q[..., j].reshape(k, r, n_i * s),
                            delta[:, :, :, j].flatten(2),
                        ),
                    )
                    for j in range(g)
                )
            )
    return _cat(parts, 1)


def _dense_cheaper(dims: _Dims | None, n_subnetworks: int, rank: int) -> bool:
    """Whether a step is faster when a weight's per-sample gradients are formed once (a
    convolution's from its inputs, `_conv_weight_gradients`) and projected as they are
    (`TensorFactors.inner_dense`) than when its signal is projected, with neither the gradients
    nor the dense directions larger than the signal: many positions on a small kernel, as in a
    CNN's first stages (1,024 positions of a 64 x 576 kernel: 10x faster). The step projects
    onto V_in and V_out, each with a backward, and takes ||g||^2: the signal's
    6 n S K R (in + T out) multiply-adds plus those of `_sq_norms_flat`, against
    n T out in (S + 4 K) for forming the gradients and projecting them, products that run at
    about half the rate on one CPU thread (`benchmarks/bench_formed.py`: this picks the faster
    way in all of its 20 cases)."""
    if dims is None:
        return False
    t, n, s, g, out_g, in_g = dims
    n_v, kr = n_subnetworks, n_subnetworks * rank
    weight = g * out_g * in_g
    formed = t * n * weight * (s + 4 * n_v)
    norms = t * n * g * min(s * s * (out_g + in_g), s * out_g * in_g)
    factored = 6 * kr * n * s * g * (in_g + t * out_g)
    fits = max(t * n, n_v) * weight <= _signal_size(dims)
    return fits and 2 * formed < factored + 2 * norms


@dataclass(frozen=True)
class Projection:
    """The subnetworks a batch's gradients will be projected onto: n_subnetworks and each
    tensor's rank. Given to `structured_gradients`, it forms the gradients that `_dense_cheaper`
    chooses as each layer's signal is made, so that the signals (a convolution's unfolded
    patches) never all exist at once."""

    n_subnetworks: int
    ranks: dict[str, int]

    def forms(self, name: str, shape: tuple[int, ...], parts: list[_Dims | None]) -> bool:
        """Whether the gradients of `name`, of `shape`, are cheaper formed, from the sizes of its
        signals (one per module holding it)."""
        rank = _capped_rank(self.ranks[name], shape)
        return all(_dense_cheaper(dims, self.n_subnetworks, rank) for dims in parts)

    def forms_signals(self, name: str, parts: list[_MatrixSignal]) -> bool:
        """`forms`, from the signals themselves."""
        return self.forms(name, parts[0].shape, [sig.dims for sig in parts])


FormRule = Callable[[str, tuple[int, ...], list[_Dims | None]], bool]
"""Whether a weight's per-sample gradients are formed as its signals are made: from its name,
shape and the sizes of its signals (`Projection.forms`, `_no_larger`)."""


def _no_larger(name: str, shape: tuple[int, ...], parts: list[_Dims | None]) -> bool:
    """Form a weight's per-sample gradients where they are no larger than its signal (the first
    batch's checks, which read one layer's at a time: a CNN's first stages then never unfold
    their patches)."""
    weight = math.prod(shape)
    return all(d is not None and d.t * d.n * weight <= _signal_size(d) for d in parts)


def _signal_size(d: _Dims) -> int:
    """The elements of a signal's a and delta."""
    return d.n * d.s * d.g * (d.in_g + d.t * d.out_g)


def _capped_rank(rank: int, shape: tuple[int, ...]) -> int:
    """A matrix signal's rank as its factors cap it (`TensorFactors.rank`, CP)."""
    return min(rank, max_rank(shape, "cp"))


def _sq_norms_matrix(sig: _MatrixSignal) -> Tensor:
    return _unflat(_sq_norms_flat(sig), sig)


def _sq_norms_flat(sig: _MatrixSignal) -> Tensor:
    """||sum_s delta_s (x) a_s||^2 per sample, (T, n): via position Gram matrices
    sum_{s,z} (delta_s . delta_z)(a_s . a_z) when positions are few, else by forming the
    (small) per-sample tensor, whichever costs less."""
    t, n, s, g, out_g = sig.delta.shape
    if sig.is_embedding:
        same = (sig.a[:, :, None] == sig.a[:, None, :]).to(sig.delta.dtype)  # (n, S, S)
        dd = torch.einsum("tnso,tnzo->tnsz", sig.delta[:, :, :, 0], sig.delta[:, :, :, 0])
        return torch.einsum("tnsz,nsz->tn", dd, same)
    in_g = sig.a.shape[-1]
    gram = s * s * (out_g + in_g) <= s * out_g * in_g
    parts = []
    for i in _chunks(n, t * g * (s * s if gram else out_g * in_g)):
        a, delta = sig.a[i], sig.delta[:, i]
        if gram:
            dd = torch.einsum("tnsgo,tnzgo->tnsgz", delta, delta)
            aa = torch.einsum("nsgi,nzgi->nsgz", a, a)
            parts.append(torch.einsum("tnsgz,nsgz->tn", dd, aa))
        else:
            grads = torch.einsum("tnsgo,nsgi->tngoi", delta, a)
            parts.append(grads.pow(2).sum(dim=(2, 3, 4)))
    return _cat(parts, 1)


def _sq_norms_parts(parts: list[_MatrixSignal]) -> Tensor:
    """||sum_p g_p||^2 per sample, (T, n): each part's own norm and twice every cross term."""
    own = total(_sq_norms_matrix(p) for p in parts)
    pairs = itertools.combinations(parts, 2)
    return own + 2 * total(_cross_matrix(p, q) for p, q in pairs) if len(parts) > 1 else own


def _outer_factors(sig: _MatrixSignal) -> tuple[Tensor, Tensor]:
    """(u, v) with the per-sample gradient sum_s u_s (x) v_s in the weight's (rows, columns)
    layout: float factors (T or 1, n, S, dim), an embedding's row ids (n, S) as they are."""
    delta = sig.delta[:, :, :, 0]  # (T, n, S, out): groups 1 (TIED_KINDS)
    if sig.is_embedding:  # row a_s receives delta_s
        return sig.a, delta
    a = sig.a[:, :, 0].unsqueeze(0)  # (1, n, S, in)
    if sig.tokens:  # a head's one position per token: both factors vary with the token
        delta = delta.reshape(sig.tokens, -1, 1, delta.shape[-1])  # (T, n, 1, out)
        a = a.reshape(sig.tokens, -1, 1, a.shape[-1])  # (T, n, 1, in)
    return (delta, a) if sig.out_mode == 0 else (a, delta)


def _inner(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """(T, n, S, Z) inner products of x's S and y's Z vectors (row ids as one-hot vectors)."""
    if not x.is_floating_point() and not y.is_floating_point():
        return (x[:, :, None] == y[:, None, :]).to(dtype).unsqueeze(0)
    if not x.is_floating_point():  # y[t, n, z, x[n, s]]
        index = x[None, :, None, :].expand(y.shape[0], -1, y.shape[2], -1)  # (T, n, Z, S)
        return torch.gather(y, 3, index).transpose(2, 3)
    if not y.is_floating_point():
        return _inner(y, x, dtype).transpose(2, 3)
    return x @ y.transpose(-1, -2)  # broadcast over T


def _cross_matrix(p: _MatrixSignal, q: _MatrixSignal) -> Tensor:
    """<g_p, g_q> per sample, (T, n), for two signals of one tied weight:
    sum_{s,z} (u_s . u'_z)(v_s . v'_z), in chunks of sequences."""
    (u, v), (u2, v2) = _outer_factors(p), _outer_factors(q)
    dense = u if u.is_floating_point() else v  # (T, n, S, dim)
    other = u2 if u2.is_floating_point() else v2
    t = max(dense.shape[0], other.shape[0])
    parts = []
    for i in _chunks(dense.shape[1], t * dense.shape[2] * other.shape[2]):
        pick = [x[:, i] if x.is_floating_point() else x[i] for x in (u, u2, v, v2)]
        rows = _inner(pick[0], pick[1], dense.dtype)
        cols = _inner(pick[2], pick[3], dense.dtype)
        parts.append((rows * cols).sum(dim=(2, 3)))
    return _cat(parts, 1)


def _dense_matrix(sig: _MatrixSignal) -> Tensor:
    """The weight's per-sample gradients sum_s delta_s (x) a_s themselves, (T, n, *shape)."""
    return _unflat(_dense_flat(sig), sig)


def _dense_flat(sig: _MatrixSignal) -> Tensor:
    t, n = sig.delta.shape[:2]
    if sig.is_embedding:  # row a_s of the (vocab, dim) table receives delta_s
        d = sig.delta[:, :, :, 0]  # (T, n, S, dim)
        index = sig.a[None, :, :, None].expand(t, -1, -1, d.shape[-1])
        return d.new_zeros(t, n, *sig.shape).scatter_add_(2, index, d)
    g = torch.einsum("tnsgo,nsgi->tngoi", sig.delta, sig.a)
    g = g.reshape(t, n, -1, g.shape[-1])  # (T, n, out, in): output channels group-major
    if sig.out_mode == 1:
        g = g.transpose(2, 3)
    return g.reshape(t, n, *sig.shape)


def _chunks(n: int, per_sequence: int) -> list[slice]:
    """Slices of the n sequences, each holding at most CHUNK_ELEMENTS intermediate elements."""
    step = max(1, CHUNK_ELEMENTS // max(per_sequence, 1))
    return [slice(i, i + step) for i in range(0, n, step)]


# The gradient batch --------------------------------------------------------------------------


@dataclass
class StructuredGradients:
    """A GradientBatch whose weight gradients stay factored as (a, delta) pairs.

    matrices: {name: [_MatrixSignal]} (a tied weight: one per module holding it, summed);
    vectors: {name: (n_samples, *shape)} exact per-sample
    gradients of biases, LayerNorm vectors and generic-path tensors; `rows` maps (sequence,
    position) pairs to samples, in the row order of the generic path, and `index` is
    `sample_index(rows)`, computed once per batch.
    """

    matrices: dict[str, list[_MatrixSignal]]
    vectors: dict[str, Tensor]
    rows: SampleRows
    n_samples: int
    index: Tensor | None
    formed: set[str] = field(default_factory=set)
    """Weights whose signals were replaced by the gradients they stand for (`_form_cheaper`)."""

    def _rows(self, x: Tensor) -> Tensor:
        """(T, n, ...) -> (n_samples, ...); T is the sequence length with per_token, else 1."""
        x = x.transpose(0, 1)
        return to_rows(x, self.rows, self.index) if self.rows.per_token else x[:, 0]

    def project(self, subnetworks: Subnetworks) -> Tensor:
        factors = dict(zip(subnetworks.names, subnetworks.factors))
        self._form_cheaper(factors)
        # Summed over tensors in the signals' (T, n) layout, then gathered into rows once.
        matrices = (
            _project_matrix(sig, factors[n]) for n, parts in self.matrices.items() for sig in parts
        )
        vectors = (
            factors[n].inner_dense(g) if n in self.formed else factors[n].inner(g)
            for n, g in self.vectors.items()
        )
        return total(itertools.chain(self._rows_of_sum(matrices), vectors))

    def _form_cheaper(self, factors: dict[str, TensorFactors]) -> None:
        """Replace the signals that cost more to project than the gradients they stand for
        (`_dense_cheaper`) by those gradients, formed once for the step's projections."""
        projection = Projection(
            next(iter(factors.values())).modes[0].shape[0], {n: f.rank for n, f in factors.items()}
        )
        for name in list(self.matrices):
            if projection.forms_signals(name, self.matrices[name]):
                parts = self.matrices.pop(name)
                self.vectors[name] = self._rows(total(_dense_matrix(sig) for sig in parts))
                self.formed.add(name)

    def sq_norms(self) -> Tensor:
        matrices = (_sq_norms_parts(parts) for parts in self.matrices.values())
        vectors = (g.flatten(1).pow(2).sum(1) for g in self.vectors.values())
        return total(itertools.chain(self._rows_of_sum(matrices), vectors))

    def _rows_of_sum(self, parts: Iterator[Tensor]) -> list[Tensor]:
        """[rows of the sum of (T, n, ...) parts], or [] when there are none."""
        return [self._rows(total(parts))] if self.matrices else []

    def nbytes(self) -> int:
        signals = sum(p.a.nbytes + p.delta.nbytes for ps in self.matrices.values() for p in ps)
        return signals + sum(v.nbytes for v in self.vectors.values())

    def kept_bytes(self, n_subnetworks: int, ranks: dict[str, int]) -> int:
        """`_project_matrix` keeps q = M a, (n_v, R, n, S, G), per tensor and V; where it
        contracts delta first also p = L delta, T times larger (see there). A weight whose
        gradients the projection will form (`_dense_cheaper`) keeps them (and, as with dense
        gradients, the factor products forming the directions, of the factors' size, not
        counted); gradients formed already are the batch's own (`nbytes`)."""
        kept, projection = 0, Projection(n_subnetworks, ranks)
        for name, parts in self.matrices.items():
            rank = _capped_rank(ranks[name], parts[0].shape)
            size = parts[0].delta.element_size()
            if projection.forms_signals(name, parts):
                t, n = parts[0].delta.shape[:2]
                kept += t * n * math.prod(parts[0].shape) * size
                continue
            for sig in parts:
                t, n, s, g = sig.delta.shape[:4]
                copies = 1 + t if _delta_first(t, rank) else 1
                kept += 2 * copies * n_subnetworks * rank * n * s * g * size
        return kept

    def dense(self) -> dict[str, Tensor]:
        """The per-sample gradients formed from the signals, {name: (n_samples, *shape)}."""
        grads = {
            name: self._rows(total(_dense_matrix(p) for p in parts))
            for name, parts in self.matrices.items()
        }
        return {**grads, **self.vectors}


# Capture -------------------------------------------------------------------------------------


class _Recorder:
    """Forward hooks that keep each site's inputs and outputs (and the output head's input).
    The modules in `copied` pass a copy of their output on, so that an in-place op after them
    leaves the kept output as the layer computed it."""

    def __init__(self, sites: list[_Site], head: nn.Module | None, copied: set[str]) -> None:
        self.inputs: dict[str, list[Tensor]] = {s.module_name: [] for s in sites}
        self.outputs: dict[str, list[Tensor]] = {s.module_name: [] for s in sites}
        self._versions: dict[str, list[int]] = {s.module_name: [] for s in sites}
        self.head_input: Tensor | None = None
        self._handles = []
        for site in sites:
            hook = self._keep(site.module_name, site.module_name in copied)
            self._handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
        if head is not None:
            self._handles.append(head.register_forward_hook(self._keep_head, with_kwargs=True))

    def _keep(self, name: str, copy: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
            self.inputs[name].append(_first_input(args, kwargs).detach())
            self.outputs[name].append(output)
            self._versions[name].append(output._version)
            return output.clone() if copy else None

        return hook

    def _keep_head(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        self.head_input = _first_input(args, kwargs)

    def changed(self) -> set[str]:
        """The modules an output of which was changed in place after the call."""
        return {
            name
            for name, outputs in self.outputs.items()
            if any(o._version != v for o, v in zip(outputs, self._versions[name]))
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _record(
    target: Target,
    inputs: Inputs,
    params: dict[str, Tensor],
    plan: StructuredPlan,
    head: nn.Module | None,
) -> tuple[Tensor, _Recorder]:
    """The outputs of one forward that records every site's calls. An in-place op on a recorded
    output (ResNet's BatchNorm then ReLU(inplace=True), `out += identity`) would make it the
    op's result, and its gradient the op's output gradient: such a module passes on a copy from
    then on (`StructuredPlan.copied`), found by the outputs' version counters on any batch (the
    first, for a model that always does it), which then runs again."""
    while True:
        recorder = _Recorder(plan.sites, head, plan.copied)
        try:
            with torch.enable_grad():
                outputs = target.forward(inputs, params)
        finally:
            recorder.remove()
        changed = recorder.changed() - plan.copied
        if not changed:
            return outputs, recorder
        plan.copied |= changed
        del outputs, recorder  # this forward's graph, before the next one is made


# The torch layer whose computation each kind's signals assume (embeddings have checks of their
# own: `_row_ids`, a scaled output's `embed_scale`, `_check_uses`).
_LAYERS: dict[str, type[nn.Module]] = {
    "linear": nn.Linear,
    "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d,
    "conv3d": nn.Conv3d,
    "conv_transpose1d": nn.ConvTranspose1d,
    "conv_transpose2d": nn.ConvTranspose2d,
    "conv_transpose3d": nn.ConvTranspose3d,
    "layernorm": nn.LayerNorm,
    "batchnorm": nn.modules.batchnorm._BatchNorm,
    "groupnorm": nn.GroupNorm,
    "instancenorm": nn.modules.instancenorm._InstanceNorm,
}


def _layer_function(site: _Site, recorder: _Recorder) -> bool:
    """Whether a subclass that overrides forward still computes its layer's function of the
    input it is called with (a causal convolution padding its input itself, a Linear flattening
    it: the hooks would read the input before that). Layers that keep torch's forward do."""
    layer = _LAYERS.get(site.kind)
    if layer is None or type(site.module).forward is layer.forward:
        return True
    name = site.module_name
    with torch.no_grad():
        for x, out in zip(recorder.inputs[name], recorder.outputs[name]):
            try:
                again = layer.forward(site.module, x)
            except (RuntimeError, ValueError, IndexError):  # e.g. an input it flattens first
                return False
            if again.shape != out.shape or not torch.allclose(again, out, rtol=1e-4, atol=1e-6):
                return False
    return True


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    """The layer's input, passed by position or by keyword (`self.fc(input=x)`); the supported
    layers take one."""
    return args[0] if args else next(iter(kwargs.values()))


def _output_head(model: nn.Module, sites: list[_Site]) -> nn.Module | None:
    """The per-position output head (e.g. lm_head), if the model names one and no decomposed
    module lies inside it other than the head itself."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    inside = {id(m) for m in head.modules() if m is not head}
    return None if any(id(s.module) in inside for s in sites) else head


def _head_site(plan: StructuredPlan, recorder: _Recorder, head: nn.Module | None) -> _Site | None:
    """The decomposed output head whose per-token signal can be read off the head's own output
    cotangent and input (`_MatrixSignal.tokens`): called once, on (n, T, in)."""
    site = next((s for s in plan.sites if head is not None and s.module is head), None)
    if site is None or site.kind not in ("linear", "gpt2_conv1d"):
        return None
    calls, head_input = recorder.outputs[site.module_name], recorder.head_input
    if len(calls) != 1 or head_input is None or head_input.dim() != 3:
        return None
    return site if calls[0].shape[:2] == head_input.shape[:2] else None


def _token_cotangents(root: Tensor, cot: Tensor, positions: Tensor) -> Tensor:
    """(P, *root.shape): copy p carries cot at sequence position positions[p] only."""
    seq = root.shape[1]
    # A comparison, not F.one_hot, whose range check synchronises with the host.
    onehot = (positions[:, None] == torch.arange(seq, device=cot.device)).to(cot.dtype)  # (P, seq)
    view = (len(positions), 1, seq) + (1,) * (cot.dim() - 2)
    return onehot.view(view) * cot.unsqueeze(0)


def structured_gradients(
    target: Target,
    inputs: Inputs,
    references: Tensor | Callable[[Tensor], Tensor],
    divergence: DivergenceFn,
    *,
    plan: StructuredPlan,
    per_token: bool = False,
    chunk_size: int | None = None,
    projection: Projection | None = None,
) -> StructuredGradients:
    """Per-sample gradient signals for one batch (see the module docstring).

    references: reference outputs shaped like the model's outputs for `inputs`, or a function
    drawing them from those outputs (so the batch needs only one forward).
    projection: the subnetworks the batch is for, to form gradients as signals are made.
    """
    head = _output_head(target.model, plan.sites) if per_token else None
    # Decomposed tensors require grad so that every site's output is part of the graph, even a
    # first layer whose input does not; only gradients with respect to outputs are taken.
    params = {n: w.detach().requires_grad_() for n, w in target.w0.items()}
    outputs, recorder = _record(target, inputs, params, plan, head)
    if callable(references):
        references = references(outputs.detach())
    references = check_references(references, outputs)
    rows = SampleRows.of(inputs, per_token)
    batch = outputs.shape[0]
    for site in list(plan.sites):
        if not recorder.outputs[site.module_name]:
            # nn.MultiheadAttention's out_proj: the functional attention reads its weight and
            # bias, the Linear itself is never called, so its hooks hold no signal.
            plan.demote(site, "module never called: the forward reads the tensor directly")
        elif not plan.uses_checked and not _layer_function(site, recorder):
            plan.demote(site, f"{type(site.module).__name__} overrides forward otherwise")
        elif per_token and site.kind in TRANSPOSED:
            plan.demote(site, "a transposed convolution with per-token samples")
        elif not all(_batched(site, o, outputs) for o in recorder.outputs[site.module_name]):
            # e.g. position embeddings computed once and broadcast over the batch: their
            # output-gradient already sums over samples, so per-sample signals are lost.
            plan.demote(site, "output not batched per sample")
        elif (
            not plan.uses_checked
            and site.kind == "embedding"
            and not all(
                _row_ids(a, cast(nn.Embedding, site.module))
                for a in recorder.inputs[site.module_name]
            )
        ):
            # A subclass called with other values than the rows it looks up (positions drawn
            # from the ids or the mask): the checks' signals would index its weight with them.
            # One whose values fit passes here and `_check_uses` finds it out.
            plan.demote(site, "called with other values than row ids")
    grouping = not plan.rows_checked and batch > 1  # one sample's rows are all its own
    if not plan.uses_checked or grouping:
        uses = not plan.uses_checked
        _check_uses(plan, recorder, params, outputs, batch, uses=uses, rows=grouping)
        plan.uses_checked, plan.rows_checked = True, plan.rows_checked or grouping
    head_site = _head_site(plan, recorder, head) if per_token else None
    if head is not None and head_site is None and any(s.module is head for s in plan.sites):
        recorder.head_input = None  # a decomposed head read per token: backwards start above it
    site_outputs = [
        o for s in plan.sites if s is not head_site for o in recorder.outputs[s.module_name]
    ]

    with torch.enable_grad():
        y = outputs.detach().requires_grad_()
        flat_y = y.flatten(0, 1) if per_token else y
        flat_ref = references.flatten(0, 1) if per_token else references
        values = vmap(divergence)(flat_y, flat_ref)
        (dd_dy,) = torch.autograd.grad(values.sum(), y)  # each sample's dD_i/dy_i in its row
    weights = rows.weights(dd_dy)
    if weights is not None:  # positions that are no sample send no gradient
        dd_dy = dd_dy * weights

    deltas, heads = _output_gradients(
        outputs, site_outputs, dd_dy, recorder, head_site, per_token, chunk_size
    )
    # Only `_signals` holds the forward's inputs and output-gradients now, freeing each layer's
    # once its signal is made (what it keeps is the signals not formed).
    del outputs, site_outputs, dd_dy, y, flat_y, values
    recorder.outputs.clear()
    recorder.head_input = None  # its graph holds every layer's saved tensors
    form = projection.forms if projection is not None else None
    matrices, vectors, formed = _signals(plan.sites, recorder.inputs, deltas, batch, heads, form)
    index, n_samples = sample_index(rows, batch)
    result = StructuredGradients(matrices, {}, rows, n_samples, index, formed)
    vectors = {n: result._rows(v) for n, v in vectors.items()}
    if plan.generic:
        sub = Target(
            target.model,
            plan.generic,
            {n: target.w0[n] for n in plan.generic},
            {**target.frozen, **{n: w for n, w in target.w0.items() if n not in plan.generic}},
        )
        looped = plan.per_sample.loop
        vectors.update(
            plan.per_sample.gradients(
                sub, inputs, references, divergence, per_token=per_token, chunk_size=chunk_size
            )
        )
        if plan.per_sample.loop and not looped:
            plan.say_one_sample_at_a_time()
    check_finite_gradients(vectors)
    result.vectors = vectors
    return result


def _output_gradients(
    outputs: Tensor,
    site_outputs: list[Tensor],
    dd_dy: Tensor,
    recorder: _Recorder,
    head_site: _Site | None,
    per_token: bool,
    chunk_size: int | None,
) -> tuple[list[Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Each site call's output-gradient (T, n, *output shape), in `site_outputs`' order, from
    one backward of the divergences' gradients dd_dy (per token: one per chunk of positions);
    and a decomposed head read per token's (output cotangent, input) (`_signals`' heads)."""
    heads: dict[str, tuple[Tensor, Tensor]] = {}
    if not site_outputs and head_site is None:
        deltas: list[Tensor] = []
    elif not per_token:
        grads = torch.autograd.grad(outputs, site_outputs, dd_dy, allow_unused=True)
        deltas = [
            torch.zeros_like(o).unsqueeze(0) if d is None else d.unsqueeze(0)
            for o, d in zip(site_outputs, grads)
        ]
    else:
        root, cot = outputs, dd_dy
        if recorder.head_input is not None:
            # The head is position-wise: one backward through it serves all tokens at once, and
            # a decomposed head's own signal for token t is its output cotangent at t (x) its
            # input at t.
            root = recorder.head_input
            if head_site is None:
                (cot,) = torch.autograd.grad(outputs, root, dd_dy, retain_graph=True)
            else:
                head_output = recorder.outputs[head_site.module_name][0]
                cot, head_cot = torch.autograd.grad(
                    outputs, [root, head_output], dd_dy, retain_graph=True
                )
                heads[head_site.module_name] = (head_cot, root.detach())
        seq = root.shape[1]
        step = chunk_size or DEFAULT_TOKEN_CHUNK
        parts = []
        for start in range(0, seq, step):
            positions = torch.arange(start, min(seq, start + step), device=cot.device)
            parts.append(
                torch.autograd.grad(
                    root,
                    site_outputs,
                    _token_cotangents(root, cot, positions),
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            )
        sizes = [min(step, seq - start) for start in range(0, seq, step)]
        deltas = [
            _cat(
                [
                    o.new_zeros(size, *o.shape) if p[j] is None else p[j]
                    for size, p in zip(sizes, parts)
                ],
                0,
            )
            for j, o in enumerate(site_outputs)
        ]

    return deltas, heads


USES_RTOL = 1e-2
"""`_check_uses` tolerance, relative to the gradient's norm: far above the rounding of two
contraction orders (also at matmul_precision 'medium' or with TF32), far below a second use's
share in the cases met (0.4-0.8); a second use carrying under 1 % of a gradient goes unseen."""
USES_ATOL = 1e-6
"""... and relative to the largest gradient checked: a tensor whose gradient is round-off on
both sides (OPT's key bias, which shifts every score of a query alike) keeps its path."""


def _batched(site: _Site, output: Tensor, outputs: Tensor) -> bool:
    """Whether a call's output can hold per-sample rows: the batch first, or (all but Conv2d,
    whose patches are taken per leading row) a sequence model's batch and positions flattened
    into one axis, as OPT's MLP does. That the rows are grouped by sample is `_check_uses`' to
    confirm, on the first batch: other row counts (a layer on tokens routed by the data, whose
    grouping changes from batch to batch) are never read per sample."""
    if output.dim() == 0:
        return False
    rows = output.shape[0]
    batch = outputs.shape[0]
    if rows == batch:
        return True
    conv = site.kind in CONVS
    return not conv and outputs.dim() > 2 and rows == batch * outputs.shape[1]


def _row_ids(a: Tensor, embedding: nn.Embedding) -> bool:
    """Whether an Embedding's hooked input can be the row ids it looks up."""
    if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool or a.numel() == 0:
        return a.numel() == 0
    return bool(a.min() >= 0) and bool(a.max() < embedding.num_embeddings)


def _check_uses(
    plan: StructuredPlan,
    recorder: _Recorder,
    params: dict[str, Tensor],
    outputs: Tensor,
    batch: int,
    *,
    uses: bool,
    rows: bool,
) -> None:
    """Send to the generic path the tensors whose per-sample gradients the signals would get
    wrong, found by comparing the hooked calls' gradient with autograd's for a random cotangent c
    on the outputs (random: no sum cancels):
    - for c on every sample, the calls' sum over samples differs from the whole gradient when the
      tensor is used outside them too (a tied head written h @ wte.weight.T, a bias added again
      later) or its module computes on something else than the input it is called with (OPT's
      positions, an Embedding called with the attention mask);
    - for c on the first sample only, the calls' row of that sample differs from the whole
      gradient when a call's rows are not grouped by sample (a layer run on (seq, batch, ...):
      its rows are positions even where seq equals the batch, and only their sum is right).
    `uses` and `rows` choose the checks: the second needs a batch of several samples."""
    generator = torch.Generator().manual_seed(0)
    cot = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype).to(outputs.device)
    checks = []
    if uses:
        checks.append(
            ("gradient not all through its module's calls: used outside them?", cot, False)
        )
    if rows:
        first = torch.zeros_like(cot)
        first[0] = cot[0]
        checks.append(("rows not grouped by sample: is its first axis the sample?", first, True))
    for reason, c, first_sample in checks:
        if not plan.sites:  # all demoted already
            return
        full, calls = _calls_gradient(plan, recorder, params, outputs, batch, c, first_sample)
        largest = max(max(full[n].norm().item(), calls[n].norm().item()) for n in full)
        for site in list(plan.sites):
            wrong = []
            for name in site.tensors.values():
                scale = max(full[name].norm().item(), calls[name].norm().item())
                error = (full[name] - calls[name]).norm().item()
                if error > USES_RTOL * scale + USES_ATOL * largest:
                    wrong.append(name)
            if wrong:
                plan.demote(site, reason, wrong)


def _calls_gradient(
    plan: StructuredPlan,
    recorder: _Recorder,
    params: dict[str, Tensor],
    outputs: Tensor,
    batch: int,
    cot: Tensor,
    first_sample: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Autograd's whole gradient of <cot, outputs> for each structured tensor, and the one formed
    from the hooked calls' signals: summed over samples, or the first sample's row alone."""
    names = list(dict.fromkeys(n for site in plan.sites for n in site.tensors.values()))
    site_outputs = [o for site in plan.sites for o in recorder.outputs[site.module_name]]
    grads = torch.autograd.grad(
        outputs,
        [params[n] for n in names] + site_outputs,
        cot,
        retain_graph=True,
        allow_unused=True,
    )
    whole = zip(names, grads[: len(names)])
    # Each output-gradient is held by `deltas` alone, freed once its site is checked.
    deltas = [
        (torch.zeros_like(o) if d is None else d).unsqueeze(0)
        for o, d in zip(site_outputs, grads[len(names) :])
    ][::-1]
    del grads, site_outputs
    calls: dict[str, Tensor] = {}
    for site in plan.sites:  # one at a time: every layer's signals never exist at once
        mine = [deltas.pop() for _ in recorder.outputs[site.module_name]]
        own_inputs = {site.module_name: list(recorder.inputs[site.module_name])}
        matrices, vectors, _ = _signals([site], own_inputs, mine, batch, form=_no_larger)
        owns = [(n, v[0, 0] if first_sample else v.sum(dim=(0, 1))) for n, v in vectors.items()]
        for name, parts in matrices.items():
            owns.append(
                (name, total(_dense_matrix(_one(sig, first_sample))[0, 0] for sig in parts))
            )
        for name, own in owns:  # a tied weight: summed over its holders
            calls[name] = calls[name] + own if name in calls else own
    full = {n: torch.zeros_like(calls[n]) if g is None else g for n, g in whole}
    return full, calls


def _one(sig: _MatrixSignal, first_sample: bool) -> _MatrixSignal:
    """The first sample's signal, or all samples' positions as one sample's (the dense sum over
    samples)."""
    _, n, positions, g, out_g = sig.delta.shape  # (1, n, S, G, out_g)
    if first_sample:
        delta, a = sig.delta[:, :1], sig.a[:1]
    else:
        delta = sig.delta.reshape(1, 1, n * positions, g, out_g)
        a = sig.a.reshape(1, n * positions, *sig.a.shape[2:])
    return _MatrixSignal(delta, a, sig.out_mode, sig.shape, sig.groups)


def _rms_eps(module: nn.Module, x: Tensor) -> float:
    """An RMSNorm's epsilon: transformers' `variance_epsilon` or `eps`, torch's `eps` (None:
    the input dtype's machine epsilon, as torch.nn.RMSNorm does)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return torch.finfo(x.dtype).eps if eps is None else float(eps)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """torch.cat without the copy when there is only one part (the usual case)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _signals(
    sites: list[_Site],
    inputs: dict[str, list[Tensor]],
    deltas: list[Tensor],
    batch: int,
    heads: dict[str, tuple[Tensor, Tensor]] | None = None,
    form: FormRule | None = None,
) -> tuple[dict[str, list[_MatrixSignal]], dict[str, Tensor], set[str]]:
    """Turn each site's captured inputs and output-gradients into factored weight signals and
    exact per-sample vector gradients, (T, n, *shape). A module applied several times in one
    forward contributes each use's positions to the same sum. heads: {module name: (output
    cotangent, input)}, each (n, T, features), of an output head read per token (no deltas).
    A weight held by one module whose gradients `form` chooses has them among the vectors, and
    its name in the returned set (a convolution's formed from its inputs, without patches).
    inputs ({module name: its calls' inputs}) and deltas (the calls' output-gradients, in the
    sites' order) are consumed, so that each layer's are freed once its signal is made."""
    matrices: dict[str, list[_MatrixSignal]] = {}
    vectors: dict[str, Tensor] = {}
    formed: set[str] = set()
    holders = collections.Counter(n for site in sites for n in site.tensors.values())
    deltas.reverse()  # consumed from the end, each freed once its signal is made
    for site in sites:
        m = site.module
        if heads and site.module_name in heads:
            cot, a = heads[site.module_name]
            tokens = cot.shape[1]
            signal = _MatrixSignal(
                cot.transpose(0, 1).reshape(1, tokens * batch, 1, 1, cot.shape[-1]),
                a.transpose(0, 1).reshape(tokens * batch, 1, 1, a.shape[-1]),
                1 if site.kind == "gpt2_conv1d" else 0,
                tuple(cast(Tensor, m.weight).shape),
                tokens=tokens,
            )
            if "weight" in site.tensors:
                matrices.setdefault(site.tensors["weight"], []).append(signal)
            if "bias" in site.tensors:
                vectors[site.tensors["bias"]] = cot.transpose(0, 1)  # (T, n, out)
            continue
        uses = [(a, deltas.pop()) for a in inputs.pop(site.module_name)]
        name = site.tensors.get("weight")
        if (
            site.kind in CONVS
            and uses[0][1].shape[0] == 1  # per-token output-gradients: formed from the signal
            and name is not None
            and form is not None
            and holders[name] == 1
            and form(name, tuple(cast(Tensor, m.weight).shape), [_conv_dims(m, uses)])
        ):
            # Formed from the inputs: the unfolded patches are never made.
            vectors[name] = _conv_weight_gradients(m, uses)
            formed.add(name)
            if "bias" in site.tensors:
                bias_sum = (_conv_delta(m, d).sum(2).flatten(2) for _, d in uses)
                vectors[site.tensors["bias"]] = total(bias_sum)
            continue
        weight_parts, bias_parts, a_parts = [], [], []
        while uses:
            a, d = uses.pop(0)
            t = d.shape[0]
            bias: Tensor | None = None  # the output-gradient by position, where not dd
            if site.kind in ("linear", "gpt2_conv1d"):
                out = d.shape[-1]
                dd = d.reshape(t, batch, -1, 1, out)
                aa = _as_positions(a, batch, a.shape[-1]).unsqueeze(2)
            elif site.kind in ("conv1d", "conv2d", "conv3d"):
                dd = _conv_delta(m, d)
                aa = _conv_patches(m, a)
            elif site.kind in TRANSPOSED:
                # The adjoint of a convolution: its weight's gradient is that convolution's with
                # input and output-gradient swapped, the input at each of its positions times the
                # output-gradient's unfolded patch there (one per sample: per-token samples take
                # the generic path).
                dd = _conv_delta(m, a.unsqueeze(0))
                aa = _transposed_patches(m, d[0], a.shape[2:])
                bias = _conv_delta(m, d)
            elif site.kind == "embedding":
                dd = d.reshape(t, batch, -1, 1, d.shape[-1])
                scale = getattr(m, "embed_scale", None)
                if isinstance(scale, Tensor) and scale.numel() == 1:
                    # transformers' scaled embeddings (Gemma's: rows times sqrt(hidden)); one
                    # that computes otherwise fails `_check_uses` and takes the generic path.
                    dd = dd * scale.to(dd.dtype)
                aa = a.reshape(batch, -1)
                padding_idx = cast(nn.Embedding, m).padding_idx
                if padding_idx is not None:  # the padding row never receives gradient
                    dd = dd * (aa != padding_idx)[None, :, :, None, None].to(dd.dtype)
            elif site.kind == "layernorm":
                norm = cast(nn.LayerNorm, m)
                size = math.prod(norm.normalized_shape)
                xhat = F.layer_norm(a, norm.normalized_shape, None, None, norm.eps)
                dd = d.reshape(t, batch, -1, size)
                aa = xhat.reshape(batch, -1, size)
            elif site.kind == "batchnorm":
                bn = cast(nn.modules.batchnorm._BatchNorm, m)
                mean, var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
                view = (-1,) + (1,) * (a.dim() - 2)  # the channel axis is 1
                xhat = (a - mean.view(view)) * torch.rsqrt(var.view(view) + bn.eps)
                dd = _channels_last(d, batch, 1)
                aa = _channels_last(xhat, batch, 0)
            elif site.kind == "groupnorm":  # statistics per sample and group of channels
                gn = cast(nn.GroupNorm, m)
                xhat = F.group_norm(a, gn.num_groups, None, None, gn.eps)
                dd = _channels_last(d, batch, 1)
                aa = _channels_last(xhat, batch, 0)
            elif site.kind == "instancenorm":  # as its forward in eval mode, without the affine
                inorm = cast(nn.modules.instancenorm._InstanceNorm, m)
                stats = inorm.running_mean, inorm.running_var
                tracked = inorm.track_running_stats
                xhat = F.instance_norm(a, *stats, None, None, not tracked, 0.0, inorm.eps)
                dd = _channels_last(d, batch, 1)
                aa = _channels_last(xhat, batch, 0)
            else:  # rmsnorm: over the weight's (trailing) axes
                size = cast(Tensor, m.weight).numel()
                flat = a.reshape(batch, -1, size)
                eps = _rms_eps(m, flat)
                dd = d.reshape(t, batch, -1, size)
                aa = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps)
            weight_parts.append(dd)
            a_parts.append(aa)
            bias_parts.append(dd if bias is None else bias)
        if site.kind in ("layernorm", "rmsnorm", "batchnorm", "groupnorm", "instancenorm"):
            shape = tuple(cast(Tensor, m.weight).shape)
            if "weight" in site.tensors:
                w = total(
                    torch.einsum("tnsf,nsf->tnf", d, a) for d, a in zip(weight_parts, a_parts)
                )
                vectors[site.tensors["weight"]] = w.reshape(*w.shape[:2], *shape)
            if "bias" in site.tensors:
                b = total(d.sum(2) for d in bias_parts)
                vectors[site.tensors["bias"]] = b.reshape(*b.shape[:2], *shape)
            continue
        if "weight" in site.tensors:
            out_mode = 1 if site.kind in ("gpt2_conv1d", "embedding") else 0
            groups = cast(nn.Conv2d, m).groups if site.kind in CONVS else 1
            weight = cast(Tensor, m.weight)
            signal = _MatrixSignal(
                _cat(weight_parts, 2), _cat(a_parts, 1), out_mode, tuple(weight.shape), groups
            )
            name = site.tensors["weight"]
            if form is not None and holders[name] == 1 and form(name, signal.shape, [signal.dims]):
                vectors[name] = _dense_matrix(signal)
                formed.add(name)
            else:
                matrices.setdefault(name, []).append(signal)  # tied: one per holder
        if "bias" in site.tensors:
            vectors[site.tensors["bias"]] = total(d.sum(2).flatten(2) for d in bias_parts)
    return matrices, vectors, formed
