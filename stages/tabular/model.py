"""The tabular model: an MLP, rebuilt from the `arch` dict stored beside its weights."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear → ReLU → Dropout blocks, then a linear head (logits or one regression value)."""

    def __init__(self, n_in: int, hidden: list[int], n_out: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout)]
            n_in = width
        layers.append(nn.Linear(n_in, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(arch: dict) -> nn.Module:
    return MLP(arch["n_in"], arch["hidden"], arch["n_out"], arch["dropout"])
