"""Toy model of superposition (Elhage et al. 2022; Section 3.1): relu(W^T W x + b).

Decomposed, as in the paper, as untied tensors: the encoder W_in (hidden, features), the decoder
W_out (features, hidden) and the bias b. Feature j's own parameters are column j of W_in, row j of
W_out and b_j: a perfect subnetwork for feature j lies entirely on them.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn


class TMS(nn.Module):
    W_in: nn.Parameter
    W_out: nn.Parameter
    b: nn.Parameter

    def __init__(self, n_features: int = 5, n_hidden: int = 2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.empty(n_hidden, n_features)
        std = (2.0 / (n_hidden + n_features)) ** 0.5  # Xavier normal, as the authors' code
        w.normal_(0.0, std, generator=g)
        self.W_in = nn.Parameter(w.clone())
        self.W_out = nn.Parameter(w.T.clone())
        self.b = nn.Parameter(torch.zeros(n_features))

    def forward(self, x: Tensor) -> Tensor:  # (batch, features) -> (batch, features)
        return torch.relu(x @ self.W_in.T @ self.W_out.T + self.b)

    @torch.no_grad()
    def tie_(self) -> None:
        """Training uses tied weights (W_out = W_in^T); decomposition treats them as separate."""
        self.W_out.copy_(self.W_in.T)


def feature_parameter_mask(model: TMS) -> dict[str, Tensor]:
    """{param: (n_features, *param_shape) bool}: which entries are feature j's own parameters."""
    n_hidden, n_features = model.W_in.shape
    eye = torch.eye(n_features, dtype=torch.bool)
    return {
        "W_in": eye[:, None, :].expand(n_features, n_hidden, n_features),
        "W_out": eye[:, :, None].expand(n_features, n_features, n_hidden),
        "b": eye,
    }


def train_toy(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int = 5000,
    batch_size: int = 1024,
    lr: float = 5e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    tied: bool = False,
) -> list[float]:
    """Train a toy model with AdamW on MSE; returns the loss every 100 steps.

    The default is the peers' recipe (10k-step scale, large batches), far cheaper on CPU than the
    paper's (10,000 points, 1000 epochs, batch 32, lr 1e-3: steps=312_500, batch_size=32, lr=1e-3).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    tms = cast(TMS, model)  # used only when tied: tied weights are a TMS's
    log = []
    for step in range(steps):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=g)
        if tied:
            tms.tie_()
        loss = (model(inputs[idx]) - targets[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if tied:  # tied weights: one shared update, the average of both views' gradients
            grad_in, grad_out = tms.W_in.grad, tms.W_out.grad
            assert grad_in is not None and grad_out is not None  # set by backward()
            with torch.no_grad():
                shared = (grad_in + grad_out.T) / 2
                grad_in.copy_(shared)
                grad_out.copy_(shared.T)
        opt.step()
        if step % 100 == 0:
            log.append(loss.item())
    if tied:
        tms.tie_()
    return log
