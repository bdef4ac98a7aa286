"""train: the image CNN through the shared loop (stages/core/job.py); images decoded by the
serving code (load_rgb, normalise) with torchvision v2 augmentation in between.

    python -m stages train image
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from stages.core.common import read_json
from stages.core.job import Job, train
from stages.core.trainer import classification_sums
from stages.image.data import load_rgb, normalise
from stages.image.model import build_model


class ImageSet(Dataset):
    """Images decoded by the serving code (load_rgb, normalise); augmentation in between."""

    def __init__(self, paths: list[Path], labels: np.ndarray, schema: dict, augment: dict | None):
        self.paths, self.labels, self.schema = paths, torch.from_numpy(labels), schema
        self.augment = None
        if augment:
            from torchvision.transforms import v2

            ops = [v2.RandomAffine(degrees=augment["rotate"], translate=(augment["translate"],) * 2,
                                   scale=tuple(augment["scale"]))]
            if augment["hflip"]:
                ops.append(v2.RandomHorizontalFlip())
            self.augment = v2.Compose(ops)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rgb = load_rgb(self.paths[i], self.schema["image_size"])
        if self.augment is not None:
            rgb = self.augment(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        x = normalise(rgb[None], self.schema["mean"], self.schema["std"])[0]
        return torch.from_numpy(x), self.labels[i]


def job(params: dict) -> Job:
    p = params["image"]["train"]
    prepared = Path("data/prepared/image")
    schema = read_json(prepared / "schema.json")
    index = pd.read_parquet(prepared / "index.parquet")
    root = Path(schema["root"])

    def subset(split: str, augment: dict | None) -> ImageSet:
        rows = index[index["split"] == split]
        labels = pd.Categorical(rows["label"], categories=schema["classes"]).codes.astype(np.int64)
        return ImageSet([root / p for p in rows.index], labels, schema, augment)

    arch = {"kind": p["arch"], "num_classes": len(schema["classes"])}
    return Job(build_model(arch, pretrained=p["pretrained"]), arch, subset("train", p["augment"]), subset("val", None),
               classification_sums, [prepared / "index.parquet"], {"schema": schema})


def run(params: dict) -> None:
    train("image", params, job)
