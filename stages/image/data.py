"""Image classification data, torch-free: the preprocessing that training, export parity,
`infer` and the app share, a split's files, and the contact sheet of mistakes.

Preprocessing (recorded in the model card): decode with PIL, convert to RGB (alpha is
dropped, grayscale replicated), resize to size × size with bilinear filtering (aspect
ratio not kept), scale to [0, 1], subtract mean and divide by std per channel, NCHW float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from stages.core import layout


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode any image PIL reads → size × size × 3 uint8."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            # Upright as the camera meant it (EXIF orientation), like every photo viewer shows it.
            upright = ImageOps.exif_transpose(im)
            return np.array(
                upright.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8
            )


def normalise(batch: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """N × H × W × 3 uint8 → N × 3 × H × W float32, per-channel (x / 255 - mean) / std."""
    x = batch.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def contact_sheet(
    items: list[tuple[Path, str]], path: Path, cell: int = 96, columns: int = 6
) -> None:
    """A PNG grid of images with a caption under each (e.g. the worst mistakes)."""
    rows = max(1, -(-len(items) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img_path, caption) in enumerate(items):
        x, y = (i % columns) * cell, (i // columns) * (cell + 14)
        with Image.open(img_path) as im:
            sheet.paste(
                im.convert("RGB").resize((cell - 4, cell - 4), Image.NEAREST), (x + 2, y + 2)
            )
        draw.text((x + 2, y + cell - 1), caption[:18], fill="black")
    sheet.save(path, format="PNG")


def preprocess(paths: list[Path], spec: dict) -> np.ndarray:
    """Files → the model's input batch (N × 3 × size × size float32), per the model card's spec."""
    size = spec["image_size"]
    batch = (
        np.stack([load_rgb(p, size) for p in paths])
        if paths
        else np.zeros((0, size, size, 3), np.uint8)
    )
    return normalise(batch, spec["mean"], spec["std"])


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[str]:
    """'7:0.981 1:0.012 …' per row: the k most likely classes with their probabilities."""
    order = np.argsort(-probs, axis=1)[:, :k]
    return [
        " ".join(f"{classes[j]}:{row[j]:.3f}" for j in idx)
        for row, idx in zip(probs, order, strict=False)
    ]


def split_images(
    schema: dict, split: str = "test", index_path: Path = layout.prepared("image") / "index.parquet"
) -> tuple[list[Path], np.ndarray]:
    """A split's files and their class indices."""
    index = pd.read_parquet(index_path)
    rows = index[index["split"] == split]
    labels = pd.Categorical(rows["label"], categories=schema["classes"]).codes
    return [Path(schema["root"]) / p for p in rows.index], np.asarray(labels)
