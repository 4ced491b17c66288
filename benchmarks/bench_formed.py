"""Where the structured step should form a weight's per-sample gradients instead of projecting
its signal: both ways timed per weight, beside what `structured._dense_cheaper` chooses.

For each case, 64 samples' random inputs and output-gradients of a k x k convolution (stride 1,
padding 1, sqrt(S) x sqrt(S) positions; k = 1: a Linear read at S positions, its signal the
random input and output-gradient) or of a 4 x 4 stride-2 transposed convolution from
sqrt(S) x sqrt(S) inputs, and two seeded factor sets (V_in, V_out):

  signal   the signal made (a convolution's unfolded patches), ||g||^2 from it
           (`_sq_norms_matrix`), both projections (`_project_matrix`) and their backward into
           every factor;
  formed   the gradients formed as the structured path forms them (a convolution's by
           `_conv_weight_gradients`, without patches; a Linear's by `_dense_matrix`), ||g||^2
           from them, both projections through `TensorFactors.inner_dense` and their backward.

Each time is the minimum of --repeats runs after one warm-up; "ratio" is formed / signal, and
"rule" says which way `_dense_cheaper` takes (formed when True).

    OMP_NUM_THREADS=1 python benchmarks/bench_formed.py
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from l3d.core.gradients import structured
from l3d.core.subnetworks import TensorFactors

# (inputs, outputs, positions, n_subnetworks, rank, kernel)
CASES = [
    (64, 64, 1024, 16, 2, 3),
    (64, 64, 64, 16, 2, 3),
    (64, 64, 256, 16, 2, 3),
    (128, 128, 256, 16, 2, 3),
    (64, 64, 256, 64, 4, 3),
    (64, 64, 64, 64, 4, 3),
    (128, 128, 64, 8, 1, 3),
    (32, 32, 16, 32, 1, 3),
    (64, 64, 256, 128, 1, 3),
    (3, 64, 1024, 16, 2, 3),
    (256, 256, 64, 32, 2, 3),
    (256, 256, 16, 32, 2, 3),
    (64, 64, 128, 16, 1, 1),
    (64, 256, 128, 16, 1, 1),
    (128, 128, 32, 32, 1, 1),
    (64, 64, 16, 16, 2, 1),
]
# Transposed convolutions, kernel 4, stride 2, padding 1 (DCGAN's): (inputs, outputs, input
# positions, n_subnetworks, rank); the layers of bench_step.py's setting e and a wider one.
TRANSPOSED_CASES = [
    (64, 64, 16, 64, 2),
    (64, 32, 64, 64, 2),
    (32, 3, 256, 64, 2),
    (128, 64, 256, 16, 2),
]


def fastest(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def case(
    inputs: int,
    outputs: int,
    positions: int,
    n_v: int,
    rank: int,
    kernel: int,
    repeats: int,
    transposed: bool = False,
):
    g = torch.Generator().manual_seed(0)
    n = 64
    side = math.isqrt(positions)
    if transposed:
        shape: tuple[int, ...] = (inputs, outputs, kernel, kernel)
        conv: torch.nn.Module = torch.nn.ConvTranspose2d(inputs, outputs, kernel, 2, 1)
        out_side = 2 * side
    else:
        shape = (outputs, inputs, kernel, kernel) if kernel > 1 else (outputs, inputs)
        conv = torch.nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2)
        out_side = side
    x = torch.randn(n, inputs, side, side, generator=g)
    delta = torch.randn(1, n, outputs, out_side, out_side, generator=g)
    linear_delta = torch.randn(1, n, positions, 1, outputs, generator=g)
    linear_a = torch.randn(n, positions, 1, inputs, generator=g)

    def make() -> structured._MatrixSignal:
        if kernel == 1:  # a Linear's signal: its input and output-gradient as they are
            return structured._MatrixSignal(linear_delta, linear_a, 0, shape)
        if transposed:  # the adjoint's: input and output-gradient swapped
            a = structured._transposed_patches(conv, delta[0], x.shape[2:])
            return structured._MatrixSignal(structured._conv_delta(conv, x[None]), a, 0, shape)
        a = structured._conv_patches(conv, x)
        return structured._MatrixSignal(structured._conv_delta(conv, delta), a, 0, shape)

    sig = make()
    v_in, v_out = (TensorFactors(shape, n_v, rank, "cp", g, torch.float32) for _ in range(2))
    params = [*v_in.parameters(), *v_out.parameters()]
    weights = torch.randn(n, n_v, generator=g)

    def backward(c: torch.Tensor, d: torch.Tensor) -> None:
        torch.autograd.grad(((c + d) * weights).sum(), params)

    def signal() -> None:
        sig = make()
        structured._sq_norms_matrix(sig)
        backward(
            structured._project_matrix(sig, v_in)[0], structured._project_matrix(sig, v_out)[0]
        )

    def formed() -> None:
        if kernel == 1:
            grads = structured._dense_matrix(make())[0]
        else:
            grads = structured._conv_weight_gradients(conv, [(x, delta)])[0]
        grads.flatten(1).pow(2).sum(1)
        backward(v_in.inner_dense(grads), v_out.inner_dense(grads))

    t_signal, t_formed = fastest(signal, repeats), fastest(formed, repeats)
    rule = structured._dense_cheaper(sig.dims, n_v, rank)
    faster = (t_formed < t_signal) == rule
    print(
        f"{inputs:4d} -> {outputs:4d}, {kernel}x{kernel}{' transposed' if transposed else ''}, "
        f"{positions:5d} positions, "
        f"{n_v:3d} x rank {rank}: signal {t_signal * 1e3:7.1f} ms, "
        f"formed {t_formed * 1e3:7.1f} ms, "
        f"ratio {t_formed / t_signal:5.2f}, rule {'formed' if rule else 'signal'}"
        f"{'' if faster else '  (the slower way)'}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for c in CASES:
        case(*c, repeats=args.repeats)
    for inputs, outputs, positions, n_v, rank in TRANSPOSED_CASES:
        case(inputs, outputs, positions, n_v, rank, 4, args.repeats, transposed=True)


if __name__ == "__main__":
    main()
