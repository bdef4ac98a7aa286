"""The tabular model, rebuilt from the `arch` dict stored beside its weights.

`name: mlp` is the original plain MLP (kept so that models trained before still load).
`name: net` is the default since issue 29 (measured on real tables, docs/tabular.md):

- smooth clipping x / sqrt(1 + (x/3)^2) of the standardised numbers (RealMLP's robust
  scaling): inside the network, so the Preprocessor, the card and serving are unchanged, and
  a heavy tail (z = 30) reaches the first layer as about 3 instead of 30;
- optional periodic numeric embeddings (rtdl-num-embeddings' PeriodicEmbeddings, lite: one
  shared linear layer; cos/sin export to ONNX);
- optional TabM-style parameter-efficient ensembling (package `tabm`: k BatchEnsemble members
  sharing their weights). In training mode the network returns every member's output,
  (batch, k, out), and the loss is the mean of the members' losses; in eval mode (export,
  evaluate, validation) it returns one output per row: for classification the log of the
  members' mean probability (softmax of it = that mean, which is what serving applies), for
  regression the members' mean.
"""

from __future__ import annotations

import math

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


def smooth_clip(x: torch.Tensor) -> torch.Tensor:
    """RealMLP's smooth clipping: identity near 0, bounded by ±3 far out."""
    return x / torch.sqrt(1 + (x / 3) ** 2)


def _ensemble_blocks(n_in: int, hidden: list[int], n_out: int, dropout: float, k: int):
    import tabm

    layers: list[nn.Module] = [tabm.EnsembleView(k=k)]
    for i, width in enumerate(hidden):
        # TabM: the first layer's input scaling starts at random signs (the members differ
        # from the first step on), the others at ones.
        init = "random-signs" if i == 0 else "ones"
        layers += [
            tabm.LinearBatchEnsemble(n_in, width, k=k, scaling_init=init),
            nn.ReLU(),
            nn.Dropout(dropout),
        ]
        n_in = width
    layers.append(tabm.LinearEnsemble(n_in, n_out, k=k))  # one head per member
    return nn.Sequential(*layers)


class TabularNet(nn.Module):
    """Numbers first (the Preprocessor's order): smooth-clipped, optionally embedded; then the
    one-hot columns; then an MLP, or k weight-sharing members of one."""

    def __init__(
        self,
        n_in: int,
        n_numeric: int,
        hidden: list[int],
        n_out: int,
        dropout: float,
        embedding: int = 0,
        ensemble: int = 1,
        classify: bool = True,
    ):
        super().__init__()
        self.n_numeric, self.k, self.classify = n_numeric, ensemble, classify
        self.embed = None
        width = n_in
        if embedding and n_numeric:
            from rtdl_num_embeddings import PeriodicEmbeddings

            # frequency_init_scale: the package's default 0.01 is for its quantile-scaled
            # inputs; 0.1 measured better on the smooth-clipped standard scores here.
            self.embed = PeriodicEmbeddings(
                n_numeric, embedding, n_frequencies=16, frequency_init_scale=0.1, lite=True
            )
            width = n_in - n_numeric + n_numeric * embedding
        if ensemble > 1:
            self.body = _ensemble_blocks(width, hidden, n_out, dropout, ensemble)
        else:
            self.body = MLP(width, hidden, n_out, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num, rest = x[:, : self.n_numeric], x[:, self.n_numeric :]
        num = smooth_clip(num)
        if self.embed is not None:
            num = self.embed(num).flatten(1)
        out = self.body(torch.cat([num, rest], 1))
        if self.k == 1 or self.training:
            return out
        if self.classify:  # log of the members' mean probability
            return torch.logsumexp(torch.log_softmax(out, -1), 1) - math.log(self.k)
        return out.mean(1)


def build_model(arch: dict) -> nn.Module:
    if arch.get("name", "mlp") == "mlp":
        return MLP(arch["n_in"], arch["hidden"], arch["n_out"], arch["dropout"])
    return TabularNet(
        arch["n_in"],
        arch["n_numeric"],
        arch["hidden"],
        arch["n_out"],
        arch["dropout"],
        arch["embedding"],
        arch["ensemble"],
        arch["classify"],
    )
