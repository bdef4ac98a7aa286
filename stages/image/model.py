"""The image models, chosen by a plain if/elif on `image.train.arch`; no registry."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import get_args

import torch
from torch import nn

from stages.core import layout
from stages.core.cli import StageError
from stages.core.schema import Arch

IMAGE_ARCHS: tuple[str, ...] = get_args(Arch)


class SmallCNN(nn.Module):
    """Three conv blocks and global pooling: enough for digits and other tiny images,
    where ImageNet networks are mostly downsampling the input away."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(3, width),
            block(width, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def torchvision_model(arch: str, num_classes: int, pretrained: bool | str) -> nn.Module:
    """A torchvision network with a `num_classes` head. `pretrained`: True loads torchvision's
    weights (downloads them: needs network), a path loads a state dict saved from the same
    architecture; either way the classifier head is then replaced."""
    import torchvision

    builder = getattr(torchvision.models, arch)
    if pretrained is False or pretrained is None:
        return builder(weights=None, num_classes=num_classes)
    if pretrained is True:
        try:
            model = builder(weights="DEFAULT")
        except Exception as e:  # noqa: BLE001 - offline machines fail inside the downloader in many ways
            raise StageError(
                f"could not download torchvision weights for {arch} ({type(e).__name__}: {e}); "
                "save them to a file and set image.train.pretrained to its path"
            ) from None
    else:
        if not Path(pretrained).is_file():
            raise StageError(f"image.train.pretrained: {pretrained}: no such file")
        model = builder(weights=None)
        try:
            model.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as e:
            # A file that is not a torch save (or is cut short, or empty) fails inside
            # torch.load with UnpicklingError / EOFError, not RuntimeError: that was a
            # traceback instead of this line (so did a saved tensor, not a dict: TypeError).
            # An empty file's EOFError has no message.
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise StageError(f"{pretrained}: not a {arch} state dict ({first})") from None
    _replace_head(model, arch, num_classes)
    return model


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    if arch == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:  # mobilenet_v3_small, efficientnet_b0: the last layer of `classifier`
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)


def earlier_run(path: str) -> dict | None:
    """The models/image/model.pt of an earlier run ({"state_dict", "meta"}) at path, else None."""
    if not Path(path).is_file():
        raise StageError(f"image.train.pretrained: {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours; torchvision_model names what is wrong with it
        return None
    return ckpt if isinstance(ckpt, dict) and {"state_dict", "meta"} <= set(ckpt) else None


def fine_tune_from(model: nn.Module, name: str, ckpt: dict, path: str) -> nn.Module:
    """Start from an earlier run's weights (any arch, small_cnn included): every tensor whose
    name and shape match; with another number of classes the head keeps its fresh weights."""
    was = ckpt["meta"]["arch"]
    was_name = was.get("name", was.get("kind"))  # `kind` in checkpoints saved before the rename
    if was_name != name:
        raise StageError(
            f"image.train.pretrained: {path} is a {was_name} model; image.train.arch is {name}"
        )
    own = model.state_dict()
    matching = {k: v for k, v in ckpt["state_dict"].items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    from stages.core.cli import log

    log(
        f"fine-tuning from {path}: {len(matching)} of {len(own)} tensors"
        + (
            f"; the head starts fresh (was {was['num_classes']} classes)"
            if len(matching) < len(own)
            else ""
        )
    )
    return model


def build_model(arch: dict, pretrained: bool | str = False) -> nn.Module:
    """Rebuild a model from the `arch` dict that train stores beside its weights; `pretrained`
    (image.train.pretrained): False, True (torchvision's weights), a torchvision state dict
    file, or an earlier run's models/image/model.pt (copied aside) to fine-tune from."""
    name = arch["name"]
    if isinstance(pretrained, str) and name in IMAGE_ARCHS:
        ckpt = earlier_run(pretrained)
        if ckpt is not None:
            return fine_tune_from(build_model(arch), name, ckpt, pretrained)
        if name == "small_cnn":
            raise StageError(
                f"image.train.pretrained: {pretrained}: small_cnn starts from an earlier run's "
                f"{layout.model_pt('image')} only"
            )
    if name == "small_cnn":
        return SmallCNN(arch["num_classes"])
    if name in IMAGE_ARCHS:
        return torchvision_model(name, arch["num_classes"], pretrained)
    raise StageError(f"image.train.arch is {name!r}; choose one of: {', '.join(IMAGE_ARCHS)}")
