"""How far one L3D training step moves when float32 matrix products run at a lower precision.

For a bench_step setting, computes one step's losses and every factor gradient of V_in and V_out
at torch's float32 matmul precisions 'highest', 'high' and 'medium' (L3DConfig.matmul_precision),
and in float64 as the reference, on the same batch and references. Prints each one's relative
error against float64: 'highest' shows the float32 rounding floor, so a lower precision is as
accurate as float32 when its error is of the same order. The last line is the step at 'highest'
with the Gram's products in bfloat16 (L3DConfig.gram_precision).

    python benchmarks/precision_check.py --setting c
"""

from __future__ import annotations

import argparse

import torch
from bench_step import initial_pair, setting

from l3d.core.algorithm import step_losses
from l3d.core.divergences import kl, mse, random_other
from l3d.core.gradients import GradientSource
from l3d.core.model import Target
from l3d.core.samples import Dataset
from l3d.core.trainer import matmul_precision


def one_step(
    model, data, config, dtype: torch.dtype, precision: str, gram: str = "float32"
) -> tuple[dict, list]:
    """Losses and factor gradients of one step, model and factors in `dtype`."""
    model = model.to(dtype)
    # The library refuses float64 models (it computes in float32); this reference run is the
    # one place that needs them, so the check is skipped here.
    GradientSource._check_precision = lambda self, batch, outputs=None: None  # type: ignore[method-assign]
    if isinstance(data, torch.Tensor):  # token ids (a dict) stay integers
        data = data.to(dtype)
    target = Target.create(model, config.params)
    source = GradientSource(
        target,
        kl if config.divergence == "kl" else mse,
        random_other,
        dataset=Dataset(data, config.batch_size),
        per_token=config.per_token,
        method="structured",
        chunk_size=config.chunk_size,
    )
    pair = initial_pair(target, config).to(dtype)
    with matmul_precision(precision):
        batch = next(source.epoch(torch.Generator().manual_seed(1), shuffle=False))
        result, _ = step_losses(pair, batch, config.top_k, gram_precision=gram)
        getattr(result, config.loss).backward()
    losses = {"paper": result.paper.item(), "pooled_squared": result.pooled_squared.item()}
    return losses, [p.grad.double() for p in pair.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="c")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, data, config, _, _ = setting(args.setting)
    model.eval()
    ref_losses, ref_grads = one_step(model, data, config, torch.float64, "highest")
    print(f"# setting {args.setting}: float64 losses {ref_losses}")
    for precision, gram in [(p, "float32") for p in ("highest", "high", "medium")] + [
        ("highest", "bfloat16")
    ]:
        losses, grads = one_step(model, data, config, torch.float32, precision, gram)
        loss_err = max(abs(losses[k] - v) / abs(v) for k, v in ref_losses.items())
        num = sum((g - r).pow(2).sum() for g, r in zip(grads, ref_grads)).sqrt()
        grad_err = (num / sum(r.pow(2).sum() for r in ref_grads).sqrt()).item()
        print(
            f"float32 at {precision:8s} (Gram in {gram:8s}) loss rel. error {loss_err:.2e}, "
            f"factor-gradient rel. error {grad_err:.2e}"
        )


if __name__ == "__main__":
    main()
