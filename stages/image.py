"""Image data, torch-free: indexing an image folder or manifest, the preprocessing that
training, export parity, `infer` and the app share, and the contact sheet of mistakes.

Preprocessing (recorded in the model card): decode with PIL, convert to RGB (alpha is
dropped, grayscale replicated), resize to size × size with bilinear filtering (aspect
ratio not kept), scale to [0, 1], subtract mean and divide by std per channel, NCHW float32.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from stages.common import StageError


def image_extensions() -> set[str]:
    """Every file extension PIL can open (png, jpg, bmp, gif, tiff, webp, ...)."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def list_images(source: str | Path) -> tuple[pd.DataFrame, Path]:
    """(path, label) for an ImageFolder root (one sub-folder per class) or a CSV manifest
    with path,label columns (paths relative to the manifest). Returns the table and the
    root the paths are relative to."""
    source = Path(source)
    if source.is_dir():
        exts = image_extensions()
        classes = sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise StageError(f"{source}: no class folders (expected one sub-folder of images per class)")
        rows = []
        for d in classes:
            # Hidden files (macOS' ._name.png resource forks among them) are not images.
            files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in exts
                           and not f.name.startswith("."))
            if not files:
                raise StageError(f"{d}: class folder {d.name!r} has no images")
            rows += [(f.relative_to(source).as_posix(), d.name) for f in files]
        return pd.DataFrame(rows, columns=["path", "label"]), source
    if source.is_file() and source.suffix.lower() == ".csv":
        try:
            table = pd.read_csv(source, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise StageError(f"{source}: not a readable manifest ({str(e).strip()})") from None
        missing = {"path", "label"} - set(table.columns)
        if missing:
            raise StageError(f"{source}: manifest needs columns path,label; missing: {', '.join(sorted(missing))}")
        if table.empty:
            raise StageError(f"{source}: the manifest lists no images")
        empty = table.index[(table["path"].str.strip() == "") | (table["label"].str.strip() == "")]
        if len(empty):
            raise StageError(f"{source}: empty path or label on lines {', '.join(str(i + 2) for i in empty[:5])}")
        gone = [p for p in table["path"] if not (source.parent / p).is_file()]
        if gone:
            raise StageError(f"{source}: {len(gone)} listed files do not exist, e.g. {', '.join(gone[:3])}")
        return table[["path", "label"]].reset_index(drop=True), source.parent
    raise StageError(f"{source}: not found (expected an image folder or a CSV manifest with path,label)")


def inspect_image(path: Path) -> dict:
    """Decode the whole file; return its size, mode, bytes, content hash, or the error."""
    data = path.read_bytes()
    info = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "width": None, "height": None,
            "mode": None, "error": None}
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # verify() misses truncated pixel data; load() does not
                info.update(width=im.width, height=im.height, mode=im.mode)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        info["error"] = f"decompression bomb: {e}"
    except ImportError as e:
        # Ultralytics, once imported, registers a HEIF opener that PIL tries on files no other
        # plugin recognises; without pi_heif that is an ImportError, not "not an image".
        info["error"] = f"UnidentifiedImageError: cannot identify image file {str(path)!r} ({e})"
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's error, reported per file
        info["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if info["error"] and not data:
        info["error"] = "empty file (0 bytes)"
    return info


def index_images(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Add width, height, mode, bytes, sha256 and error (None if it decodes) per image."""
    info = pd.DataFrame([inspect_image(root / p) for p in table["path"]], index=table.index)
    return pd.concat([table, info], axis=1)


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode any image PIL reads → size × size × 3 uint8."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            # Upright as the camera meant it (EXIF orientation), like every photo viewer shows it.
            upright = ImageOps.exif_transpose(im)
            return np.array(upright.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalise(batch: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """N × H × W × 3 uint8 → N × 3 × H × W float32, per-channel (x / 255 - mean) / std."""
    x = batch.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def contact_sheet(items: list[tuple[Path, str]], path: Path, cell: int = 96, columns: int = 6) -> None:
    """A PNG grid of images with a caption under each (e.g. the worst mistakes)."""
    rows = max(1, -(-len(items) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img_path, caption) in enumerate(items):
        x, y = (i % columns) * cell, (i // columns) * (cell + 14)
        with Image.open(img_path) as im:
            sheet.paste(im.convert("RGB").resize((cell - 4, cell - 4), Image.NEAREST), (x + 2, y + 2))
        draw.text((x + 2, y + cell - 1), caption[:18], fill="black")
    sheet.save(path, format="PNG")


def preprocess(paths: list[Path], spec: dict) -> np.ndarray:
    """Files → the model's input batch (N × 3 × size × size float32), per the model card's spec."""
    size = spec["image_size"]
    batch = np.stack([load_rgb(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)
    return normalise(batch, spec["mean"], spec["std"])


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[str]:
    """'7:0.981 1:0.012 …' per row: the k most likely classes with their probabilities."""
    order = np.argsort(-probs, axis=1)[:, :k]
    return [" ".join(f"{classes[j]}:{row[j]:.3f}" for j in idx) for row, idx in zip(probs, order)]
