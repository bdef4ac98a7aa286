"""What the image test modules share. Every image there is generated: a few classes of
simple, learnable patterns in mixed formats (PNG, JPEG, GIF, BMP, WebP), modes (RGB, RGBA,
L, P) and odd sizes.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Four classes that survive grayscale, JPEG and resizing: they differ in pattern, not colour.
PATTERNS = ("checker", "hstripes", "square", "vstripes")
# A tiny run: seconds per stage. Only image.data.source changes besides these.
TINY_IMAGE = {
    "image.data.image_size": 16,
    "image.train.epochs": 3,
    "image.train.batch_size": 16,
    "image.train.amp": "off",
    "image.validate.min_per_class": 3,
}


# --- generated images ----------------------------------------------------------------


def pattern(kind: str, width: int, height: int, seed: int) -> np.ndarray:
    """height × width × 3 uint8: a class's pattern, a random tint and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    on = {
        "checker": (yy // 6 + xx // 6) % 2 == 0,
        "hstripes": (yy // 4) % 2 == 0,
        "vstripes": (xx // 4) % 2 == 0,
        "square": (abs(yy - height / 2) < height / 4) & (abs(xx - width / 2) < width / 4),
    }[kind]
    tint = rng.uniform(0.6, 1.0, 3)
    img = np.where(on[..., None], 230 * tint, 25 * tint) + rng.normal(0, 8, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def save_image(rgb: np.ndarray, path: Path, variant: int) -> Path:
    """Save in one of several format/mode combinations (variant cycles through them)."""
    im = Image.fromarray(rgb, "RGB")
    ext, mode = [
        ("png", "RGB"),
        ("jpg", "RGB"),
        ("png", "RGBA"),
        ("png", "L"),
        ("png", "P"),
        ("jpg", "L"),
    ][variant % 6]
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(np.full(rgb.shape[:2], 128 + variant, np.uint8)))
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        im = im.convert(mode)
    path = path.with_suffix(f".{ext}")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95) if ext == "jpg" else im.save(path)
    return path


def write_image_folder(root: Path, classes=PATTERNS, per_class: int = 12) -> Path:
    """An ImageFolder: root/<class>/<n>.<ext>, mixed formats, modes and sizes (16×16, 19×23,
    24×20); every third image of a class sits in a sub-folder (they are found recursively)."""
    sizes = [(16, 16), (19, 23), (24, 20)]
    for c, kind in enumerate(classes):
        for i in range(per_class):
            w, h = sizes[i % 3]
            sub = "more/" if i % 3 == 2 else ""
            save_image(pattern(kind, w, h, seed=100 * c + i), root / kind / f"{sub}{i:02d}", i + c)
    return root


def truncated_png(path: Path) -> Path:
    """A real PNG cut in half: it opens (the header is intact), but its pixels don't decode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bomb_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A valid 1-bit PNG of width × height zeros (100 M pixels: above PIL's default
    MAX_IMAGE_PIXELS of 89.5 M, below twice that, where PIL only warns), about 12 kB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"\0" * ((1 + (width + 7) // 8) * height)  # filter byte + packed row, all zero
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    return path


def read_json(path: Path):
    return json.loads(path.read_text())


def one_line_error(res, *patterns: str) -> str:
    """Exit 1, no traceback, stderr starting with `error: ...` (validate may first say that it
    created the suite), and every pattern found in it; returns stderr from `error:` on."""
    err = res.stderr
    assert res.returncode == 1, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    before, found, rest = err.partition("error: ")
    assert found and all(
        line.startswith("created data/expectations/image/") for line in before.splitlines()
    ), err
    err = found + rest
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in:\n{err}"
    return err
