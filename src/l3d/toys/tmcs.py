"""Toy model of circuit superposition (TMCS, Section 3.2): relu(W_out W_in x + b), trained on
y = A x.

Input i's circuit is column i of W_in followed by the whole decoder, so circuits share the decoder's
parameters: a subnetwork for input i is rank 1 in W_out (its output pattern times W_in[:, i]).
The higher-rank toy (Section 3.3) is the same model on grouped inputs (see higher_rank.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TMCS(nn.Module):
    def __init__(self, n_inputs: int = 10, n_hidden: int = 5, n_outputs: int = 10, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # randn init, as the authors' code does.
        self.W_in = nn.Parameter(torch.randn(n_hidden, n_inputs, generator=g))
        self.W_out = nn.Parameter(torch.randn(n_outputs, n_hidden, generator=g))
        self.b = nn.Parameter(torch.zeros(n_outputs))

    def forward(self, x: Tensor) -> Tensor:  # (batch, inputs) -> (batch, outputs)
        return torch.relu(x @ self.W_in.T @ self.W_out.T + self.b)


def coefficient_matrix(n_inputs: int, n_outputs: int, seed: int, high: float = 3.0) -> Tensor:
    """A, (n_outputs, n_inputs), entries U(0, high): the linear map TMCS is trained to compute."""
    g = torch.Generator().manual_seed(seed)
    return high * torch.rand(n_outputs, n_inputs, generator=g)
