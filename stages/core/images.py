"""Image files, torch-free, for the image and detection tasks: the one scanner of "a folder
or a manifest", and decoding a file to learn its size, mode and content hash."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pandas as pd
from PIL import Image

from stages.core.cli import StageError


def image_extensions() -> set[str]:
    """Every file extension PIL can open (png, jpg, bmp, gif, tiff, webp, ...)."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def find_images(folder: Path) -> list[str]:
    """Image files below `folder` (recursive, any extension PIL opens), as sorted paths
    relative to it. Hidden files (macOS' ._name.png resource forks among them) are not images."""
    exts = image_extensions()
    return sorted(
        f.relative_to(folder).as_posix()
        for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in exts and not f.name.startswith(".")
    )


def list_images(source: str | Path, labelled: bool = True) -> tuple[pd.DataFrame, Path]:
    """The images of a source and the root their paths are relative to.

    `source` is a folder or a CSV manifest (a `path` column, relative to the manifest).
    labelled: the folder has one sub-folder per class, the manifest a `label` column, and
    every listed file must exist; the table has path and label. Unlabelled (inference):
    every image below the folder, or the manifest's paths as listed (a missing file is
    that row's error later); the table has path only.
    """
    source = Path(source)
    columns = ["path", "label"] if labelled else ["path"]
    if source.is_dir():
        if not labelled:
            files = find_images(source)
            if not files:
                raise StageError(f"{source}: no image files (searched recursively)")
            return pd.DataFrame({"path": files}), source
        classes = sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise StageError(
                f"{source}: no class folders (expected one sub-folder of images per class)"
            )
        rows = []
        for d in classes:
            files = find_images(d)
            if not files:
                raise StageError(f"{d}: class folder {d.name!r} has no images")
            rows += [(f"{d.name}/{f}", d.name) for f in files]
        return pd.DataFrame(rows, columns=columns), source
    if source.is_file() and source.suffix.lower() == ".csv":
        try:
            table = pd.read_csv(source, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise StageError(f"{source}: not a readable manifest ({str(e).strip()})") from None
        missing = set(columns) - set(table.columns)
        if missing:
            raise StageError(
                f"{source}: manifest needs columns {','.join(columns)}; "
                f"missing: {', '.join(sorted(missing))}"
            )
        if table.empty:
            raise StageError(f"{source}: the manifest lists no images")
        if labelled:
            empty = table.index[
                (table["path"].str.strip() == "") | (table["label"].str.strip() == "")
            ]
            if len(empty):
                raise StageError(
                    f"{source}: empty path or label on lines {', '.join(str(i + 2) for i in empty[:5])}"
                )
            gone = [p for p in table["path"] if not (source.parent / p).is_file()]
            if gone:
                raise StageError(
                    f"{source}: {len(gone)} listed files do not exist, e.g. {', '.join(gone[:3])}"
                )
        return table[columns].reset_index(drop=True), source.parent
    what = (
        "an image folder or a CSV manifest with path,label"
        if labelled
        else "an image folder or a CSV manifest with a path column"
    )
    raise StageError(f"{source}: not found (expected {what})")


def inspect_image(path: Path) -> dict:
    """Decode the whole file; return its size, mode, bytes, content hash, or the error."""
    data = path.read_bytes()
    info = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": None,
        "height": None,
        "mode": None,
        "error": None,
    }
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
