"""Time and size of `l3d report` at the paper's language-model scale (issue 6).

A run folder holding a decomposition shaped like the TinyStories-8M run (block h.4 attention:
q/k/v/out weights 256 x 256 + out bias, 100 subnetworks, CP rank 25), with random factors (the
worst case for PNG compression) and 100 epochs of metrics. Prints the seconds to write the report
and the size of the page and its images.

    python benchmarks/bench_report.py [--out /tmp/l3d-bench-report]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from l3d import io
from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair
from l3d.report import write_report


def fake_run(run: Path, n_subnetworks: int = 100, rank: int = 25) -> None:
    shapes = {f"transformer.h.4.attn.attention.{p}_proj.weight": (256, 256) for p in "qkv"}
    shapes |= {"transformer.h.4.attn.attention.out_proj.weight": (256, 256)}
    shapes |= {"transformer.h.4.attn.attention.out_proj.bias": (256,)}
    config = L3DConfig.create(
        params=list(shapes), n_subnetworks=n_subnetworks, rank=rank, divergence="kl", per_token=True
    )
    ranks = {n: rank for n in shapes}
    pair = SubnetworkPair.initialize(shapes, n_subnetworks, ranks, "cp", torch.Generator())
    p_active = torch.rand(n_subnetworks, generator=torch.Generator().manual_seed(0)) * 0.2
    p_active[: n_subnetworks // 10] = 0
    history = [
        {
            "epoch": i,
            "step": 625 * (i + 1),
            "loss_paper": 0.9 / (1 + 0.05 * i),
            "loss_pooled_squared": 0.6 / (1 + 0.05 * i),
            "lr": 1e-3,
            "top_k": 0.1,
            "live_subnetworks": n_subnetworks - n_subnetworks // 10,
            "seconds": 60.0,
        }
        for i in range(100)
    ]
    evaluation = {
        "loss_paper": history[-1]["loss_paper"],
        "loss_pooled_squared": history[-1]["loss_pooled_squared"],
        "n_samples": 160_000,
        "dead_subnetworks": list(range(n_subnetworks // 10)),
    }
    io.save_decomposition(run / "decomposition", config, pair, p_active, evaluation, history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/l3d-bench-report")
    args = parser.parse_args()
    run = Path(args.out)
    shutil.rmtree(run, ignore_errors=True)
    fake_run(run)
    start = time.perf_counter()
    page = write_report(run)
    seconds = time.perf_counter() - start
    files = [f for f in (run / "report").rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"report of 100 subnetworks x 5 tensors: {seconds:.1f} s")
    print(
        f"{len(files)} files, {size / 1e6:.1f} MB in all, "
        f"index.html {page.stat().st_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
