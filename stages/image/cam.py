"""Class activation maps (Zhou et al. 2016, "Learning Deep Features for Discriminative
Localization") as a further output of the exported graph, for the predicted class.

A network that ends in global average pooling and one linear layer computes
logit_c = sum_k W[c, k] * mean_hw A_k + b_c, so the map sum_k W[c, k] * A_k (h x w, the
last conv features A weighted by the classifier's row c) is the class score spread over
the image: no gradients, so it can live in the ONNX graph. small_cnn, resnet18 and
efficientnet_b0 end that way; mobilenet_v3_small does not (pooling, then Linear, Hardswish,
Linear: the score is not linear in the pooled features, so no row of weights maps it back;
that would take gradients, Grad-CAM, which an ONNX graph has no way to run).
"""

from __future__ import annotations

import torch
from torch import nn

from stages.core.onnx_export import WithFeatures


def cam_layers(model: nn.Module) -> tuple[nn.Module | None, str]:
    """(the global pooling whose input is the last conv features, or None; why not)."""
    modules = list(model.modules())
    pools = [i for i, m in enumerate(modules) if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        return None, "no global average pooling"
    after = [m for m in modules[pools[-1] :] if isinstance(m, nn.Linear)]
    if len(after) != 1 or any(
        not isinstance(m, (nn.Linear, nn.Dropout, nn.Flatten, nn.Sequential, nn.AdaptiveAvgPool2d))
        for m in modules[pools[-1] :]
    ):
        return None, (
            "the pooled features go through more than one linear layer (or a nonlinearity) "
            "before the class scores, so no row of weights maps a score back onto the image"
        )
    return modules[pools[-1]], ""


class WithCam(WithFeatures):
    """(outputs / temperature, penultimate features, cam [N, h, w]): the map of each
    image's predicted class (the first largest output), on the last conv features' grid."""

    def __init__(self, model: nn.Module, temperature: float | None, pool: nn.Module):
        super().__init__(model, temperature)
        maps: list[torch.Tensor] = []  # held by the hook's closure, as WithFeatures' list
        self._maps = lambda: maps
        pool.register_forward_pre_hook(lambda _m, args: maps.append(args[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._maps().clear()
        out, feats = super().forward(x)
        weights = self.head.weight[out.argmax(dim=1)]  # [N, K]: the predicted class's row
        return out, feats, torch.einsum("nkhw,nk->nhw", self._maps()[-1], weights)
