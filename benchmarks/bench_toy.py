"""Setting (a): wall-clock time of a full paper-setting toy decomposition.

TMCS-shaped model (10 inputs, 5 hidden, 10 outputs; relu(W_out W_in x + b)), 1000 sparse inputs,
10 subnetworks of rank 1, 1000 epochs of batch 32 (32 000 training steps), the paper's L3D
hyperparameters. Target (issue 5): under 60 s on 2 CPU cores.

    python benchmarks/bench_toy.py [--epochs 1000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import Tensor, nn

from l3d import L3DConfig, run
from l3d.toys.data import sparse_features


class TMCS(nn.Module):
    """relu(W_out W_in x + b), 10-5-10 as in the paper's Section 3.2 (randn init: timing only)."""

    def __init__(self, n_inputs: int = 10, n_hidden: int = 5, n_outputs: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W_in = nn.Parameter(torch.randn(n_hidden, n_inputs, generator=g))
        self.W_out = nn.Parameter(torch.randn(n_outputs, n_hidden, generator=g))
        self.b = nn.Parameter(torch.zeros(n_outputs))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W_in.T @ self.W_out.T + self.b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    x = sparse_features(1000, 10, 0.05, generator=torch.Generator().manual_seed(0))
    config = L3DConfig.create(
        params=["W_in", "W_out", "b"],
        n_subnetworks=10,
        rank=1,
        epochs=args.epochs,
        batch_size=32,
        lr=0.01,
        top_k=0.1,
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    times = []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        decomposition = run(TMCS(), x, config, progress=False)
        times.append(time.perf_counter() - start)
        steps = decomposition.history[-1]["step"]
        print(
            f"TMCS 10-5-10, {args.epochs} epochs x 1000 points, batch 32: {steps} steps in "
            f"{times[-1]:.1f} s wall ({time.process_time() - cpu:.1f} s CPU), "
            f"{times[-1] / steps * 1e3:.3f} ms/step, final loss "
            f"{decomposition.evaluation.loss_paper:.3f}"
        )
    if len(times) > 1:
        print(f"median {statistics.median(times):.1f} s over {len(times)} runs")


if __name__ == "__main__":
    main()
