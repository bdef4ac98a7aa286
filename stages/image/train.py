"""train: the image CNN through the shared loop (stages/core/job.py); images decoded once by
the serving code (load_rgb) into a memory-mapped cache, augmented and normalised per batch.

    python -m stages train image
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from stages.core import layout
from stages.core.files import atomic_path, read_json
from stages.core.job import Job, train
from stages.core.schema import Augment, Params
from stages.core.trainer import classification_sums
from stages.image.data import load_rgb
from stages.image.model import build_model


class ImageSet(Dataset):
    """A split decoded once (decoded_images: uint8, memory-mapped, shared with DataLoader
    workers) with augmentation applied per batch in `collate`, then normalised as served.

    Decoding and augmenting each image per epoch in __getitem__ took three quarters of an
    image epoch on CPU; now an item is an array slice, and the trainer's DataLoader calls
    `collate` (in its workers, when there are any) on whole batches."""

    def __init__(
        self, paths: list[Path], labels: np.ndarray, schema: dict, augment: Augment | None
    ):
        self.images = decoded_images(paths, schema["image_size"])
        self.labels, self.schema, self.augment = torch.from_numpy(labels), schema, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.images[i])), self.labels[
            i
        ]  # a copy: the map is read-only

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = (
            torch.stack([img for img, _ in items]).permute(0, 3, 1, 2).float()
        )  # N × 3 × H × W, 0..255
        if self.augment:
            x = random_affine(x, self.augment)
        mean = torch.tensor(self.schema["mean"]).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.schema["std"]).view(1, 3, 1, 1) * 255
        return ((x - mean) / std).contiguous(), torch.stack([y for _, y in items])


def random_affine(x: torch.Tensor, augment: Augment) -> torch.Tensor:
    """torchvision's RandomAffine(degrees, translate, scale) (+ RandomHorizontalFlip) drawn
    per image, applied to the whole batch at once (one grid_sample): rotation ± rotate
    degrees, shift ± translate × size, zoom within scale; outside pixels black, as v2 fills."""
    n, _, h, w = x.shape
    angle = (torch.rand(n) * 2 - 1) * math.radians(augment.rotate)
    shift = (torch.rand(n, 2) * 2 - 1) * augment.translate * 2  # in grid units: the image spans 2
    lo, hi = augment.scale
    zoom = lo + torch.rand(n) * (hi - lo)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # The sampling grid maps output to input: the inverse of rotate-zoom-then-shift.
    rot = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # N × 2 × 2
    theta = torch.cat([rot, -(rot @ shift.unsqueeze(2))], 2)
    if augment.hflip:
        flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        theta[:, 0, :] *= flip.unsqueeze(1)  # x_in = -x: mirror the sampled image
    grid = torch.nn.functional.affine_grid(theta, [n, 3, h, w], align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def decoded_images(
    paths: list[Path], size: int, cache: Path = Path(".cache/image/decoded")
) -> np.ndarray:
    """Every image through load_rgb (the serving decode) once, into an N × size × size × 3
    uint8 array memory-mapped from .cache/ (keyed by the files' paths, sizes and times and
    `size`), so repeated runs and every DataLoader worker read the same pages."""
    key = hashlib.sha256(
        json.dumps(
            [size] + [[str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]
        ).encode()
    ).hexdigest()[:20]
    path = cache / f"{key}.npy"
    if not path.exists():
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
            )
            for i, p in enumerate(paths):
                out[i] = load_rgb(p, size)
            out.flush()
            del out
    return np.load(path, mmap_mode="r")


def job(params: Params) -> Job:
    p = params.image.train
    prepared = layout.prepared("image")
    schema = read_json(prepared / layout.COLUMNS_FILE)
    index = pd.read_parquet(prepared / "index.parquet")
    root = Path(schema["root"])

    def subset(split: str, augment: Augment | None) -> ImageSet:
        rows = index[index["split"] == split]
        labels = pd.Categorical(rows["label"], categories=schema["classes"]).codes.astype(np.int64)
        return ImageSet([root / p for p in rows.index], labels, schema, augment)

    arch = {"name": p.arch, "num_classes": len(schema["classes"])}
    return Job(
        build_model(arch, pretrained=p.pretrained),
        arch,
        subset("train", p.augment),
        subset("val", None),
        classification_sums,
        [prepared / "index.parquet"],
        {"schema": schema},
    )


def run(params: Params) -> None:
    train("image", params, job)
