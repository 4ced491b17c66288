"""The peers' compressed-computation model (APD/SPD "ResidMLP"): n features written into a wide
residual stream by a fixed random embedding, one MLP layer with fewer neurons than features,
read out by the transposed embedding; trained on label x + relu(x).

Only the MLP is trained (and decomposed); W_E is a fixed buffer with unit-norm columns.
`bias=False` is the peers' model (in_bias = out_bias = False) and what the `resid_mlp` experiment
uses: a bias is one vector shared by all features, so its per-sample gradient mixes every feature's
circuit (with biases, most of each L3D subnetwork's norm sat on them and no feature got a
subnetwork of its own).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidMLP(nn.Module):
    W_E: Tensor

    def __init__(
        self,
        n_features: int = 100,
        d_resid: int = 1000,
        d_mlp: int = 50,
        seed: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w_e = torch.randn(d_resid, n_features, generator=g)
        self.register_buffer("W_E", w_e / w_e.norm(dim=0, keepdim=True))
        with torch.random.fork_rng():  # nn.Linear's init takes no generator; leave the global RNG
            torch.manual_seed(seed)
            self.mlp_in = nn.Linear(d_resid, d_mlp, bias=bias)
            self.mlp_out = nn.Linear(d_mlp, d_resid, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (batch, features) -> (batch, features)
        resid = x @ self.W_E.T
        resid = resid + self.mlp_out(torch.relu(self.mlp_in(resid)))
        return resid @ self.W_E


def resid_mlp_labels(x: Tensor) -> Tensor:
    """x + relu(x): the residual stream already carries x, the MLP must add relu(x)."""
    return x + torch.relu(x)
