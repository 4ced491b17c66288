"""The same decompositions on a CUDA device as on the CPU (skipped without one).

The CPU suite is the oracle: on a GPU the structured gradients, a whole run, the bfloat16 Gram
and the memory estimate must agree with it, TF32 (`matmul_precision="high"`) must stay close,
and a training step must not wait for the host (`torch.cuda.set_sync_debug_mode("error")`).
"""

from __future__ import annotations

import pytest
import torch

import l3d
from l3d.core.gradients import GradientSource
from l3d.core.model import Target
from l3d.core.samples import Dataset
from l3d.core.subnetworks import Subnetworks
from l3d.decomposition import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

MLP_PARAMS = ["fc1.weight", "fc2.weight"]


def _source(model, data, device: str, per_token: bool) -> GradientSource:
    model = model.to(device)
    target = Target.create(model, ["mix.weight", "head.weight"] if per_token else MLP_PARAMS)
    return GradientSource(
        target,
        "kl" if per_token else "mse",
        "mean",
        per_token=per_token,
        method="structured",
        dataset=Dataset(data, 16, device),
    )


@pytest.mark.parametrize("per_token", [False, True])
def test_structured_gradients_on_cuda_equal_the_cpu(mlp, token_model, per_token):
    model = token_model if per_token else mlp
    data = (
        {"input_ids": torch.randint(0, 7, (16, 6), generator=torch.Generator())}
        if per_token
        else torch.randn(16, 4, generator=torch.Generator())
    )
    results = []
    for device in ("cpu", "cuda"):
        source = _source(model, data, device, per_token)
        batch = next(source.epoch(torch.Generator().manual_seed(0), shuffle=False))
        v = Subnetworks(source.target.shapes, 5, {n: 2 for n in source.target.names}).to(device)
        results.append((batch.project(v).cpu(), batch.sq_norms().cpu()))
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-6)


def test_a_run_on_cuda_follows_the_cpu_run(mlp):
    x = torch.randn(128, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(params=MLP_PARAMS, n_subnetworks=6, rank=2, epochs=4, progress=False)
    cpu = l3d.decompose(mlp, x, **kw)
    cuda = l3d.decompose(mlp.cuda(), x.cuda(), device="cuda", **kw)
    for a, b in zip(cpu.history, cuda.history):
        assert b["loss_pooled_squared"] == pytest.approx(a["loss_pooled_squared"], rel=1e-3)
    tf32 = l3d.decompose(mlp.cuda(), x.cuda(), device="cuda", matmul_precision="high", **kw)
    assert tf32.history[-1]["loss_pooled_squared"] == pytest.approx(
        cpu.history[-1]["loss_pooled_squared"], rel=2e-2
    )
    low = l3d.decompose(mlp.cuda(), x.cuda(), device="cuda", gram_precision="bfloat16", **kw)
    assert low.history[-1]["loss_pooled_squared"] == pytest.approx(
        cpu.history[-1]["loss_pooled_squared"], rel=2e-2
    )


def test_the_memory_estimate_runs_on_cuda_and_matches_the_cpu(mlp):
    x = torch.randn(64, 4)
    estimates = []
    for device in ("cpu", "cuda"):
        source = _source(mlp, x, device, per_token=False)
        estimates.append(source.batch_memory(5, {n: 2 for n in MLP_PARAMS}, 16))
    assert estimates[0] == estimates[1]


def test_a_training_step_does_not_wait_for_the_host(mlp):
    config = l3d.L3DConfig.create(
        params=MLP_PARAMS, n_subnetworks=6, rank=2, epochs=1, device="cuda", batch_size=32
    )
    _, source, trainer = build(mlp.cuda(), torch.randn(64, 4), config, progress=False)
    batch = next(source.epoch(torch.Generator()))
    trainer.train_step(batch)  # warm-up: allocations, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_convolutional_and_recurrent_layers_on_cuda_equal_the_cpu(monkeypatch):
    """The structured path's CNN habits (outputs changed in place, formed gradients as each
    layer's signal is made, transposed convolutions) and the generic path's one sample at a time
    (a GRU, which vmap cannot batch; cuDNN's RNN backward also wants training mode) on a GPU
    against the CPU. The models' own convolutions in IEEE float32: cuDNN's default is TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from l3d.core.gradients.structured import Projection
    from l3d.core.model import resolve_ranks
    from test_gradients import Recurrent
    from test_structured import Decoder, InPlaceAfterLayers

    g = torch.Generator().manual_seed(0)
    cases = [
        (InPlaceAfterLayers(), torch.randn(8, 3, 5, 5, generator=g), ["conv1.*", "bn2.*", "fc.*"]),
        (Decoder(), torch.randn(8, 3, 3, 4, generator=g), ["up.*", "grouped.*", "up1d.*"]),
        (Recurrent(torch.nn.GRU), torch.randint(0, 9, (8, 5), generator=g), ["rnn.*", "head.*"]),
    ]
    for model, data, params in cases:
        results = []
        for device in ("cpu", "cuda"):
            target = Target.create(model.eval().to(device), params)
            ranks = resolve_ranks(target.names, 2)
            source = GradientSource(
                target, "kl", "mean", per_token=False, dataset=Dataset(data, 8, device),
                projection=Projection(5, ranks),
            )  # fmt: skip
            batch = next(source.epoch(torch.Generator().manual_seed(0), shuffle=False))
            v = Subnetworks(target.shapes, 5, ranks).to(device)
            results.append((batch.project(v).cpu(), batch.sq_norms().cpu()))
        for cpu, cuda in zip(*results):
            torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-6)
