"""X -> X^2 (Section 3.4): a deep narrow MLP computing every input's square at once.

Paper: 5 inputs, 4 hidden layers of 5, GeLU, linear output. Authors' code: hidden width 10, ELU
after every layer including the output, biases drawn U(0.01, 1).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn


class Squares(nn.Module):
    def __init__(
        self,
        n_inputs: int = 5,
        width: int = 5,
        n_hidden_layers: int = 4,
        activation: str = "gelu",
        activate_output: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        sizes = [n_inputs] + [width] * n_hidden_layers + [n_inputs]
        with torch.random.fork_rng():  # nn.Linear's init takes no generator; leave the global RNG
            torch.manual_seed(seed)
            linears = [nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
        self.layers = nn.ModuleList(linears)
        if activation == "elu":
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for layer in linears:
                    layer.bias.copy_(0.01 + 0.99 * torch.rand(layer.bias.shape, generator=g))
        self.act = {"gelu": nn.GELU(), "elu": nn.ELU()}[activation]
        self.activate_output = activate_output

    def forward(self, x: Tensor) -> Tensor:  # (batch, inputs) -> (batch, inputs)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        x = self.layers[-1](x)
        return self.act(x) if self.activate_output else x

    def hidden_parameters(self) -> list[str]:
        """Parameters of the hidden layers only (not the first and last), for Fig. S8."""
        names = [n for n, _ in self.named_parameters()]
        last = len(self.layers) - 1
        return [n for n in names if not n.startswith(("layers.0.", f"layers.{last}."))]
