"""demo: synthetic shapes scenes (circles, squares, triangles on textured backgrounds) in
YOLO layout → data/demo/shapes/{images,labels}/ and data.yaml, fixed by detect.demo.seed.

    python -m stages demo detect
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stages.core import layout
from stages.core.cli import log
from stages.core.files import atomic_dir
from stages.core.schema import Params
from stages.detect.boxformats import yolo_line

SHAPES = ["circle", "square", "triangle"]


def shapes_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple]]:
    """One synthetic scene: 1-6 circles, squares and triangles of random size, colour and
    position (overlaps allowed) on a textured background (gradient, stripes, noise)."""
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    bg = (c1 * (1 - t) + c2 * t) * np.ones((size, 1, 1))
    if rng.random() < 0.5:
        bg += 25 * np.sin(np.arange(size) * 2 * np.pi / rng.integers(6, 20))[:, None, None]
    bg += rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes = []
    for _ in range(int(rng.integers(1, 7))):
        cls = int(rng.integers(0, len(SHAPES)))
        s = int(rng.integers(size // 8, size // 3))
        x0, y0 = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if cls == 0:
            draw.ellipse([x0, y0, x0 + s, y0 + s], fill=colour, outline=(0, 0, 0))
        elif cls == 1:
            draw.rectangle([x0, y0, x0 + s, y0 + s], fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon(
                [(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=colour, outline=(0, 0, 0)
            )
        boxes.append((cls, (x0 + s / 2) / size, (y0 + s / 2) / size, s / size, s / size))
    return img, boxes


def run(params: Params, out_dir: str | Path = layout.DEMO["detect"]) -> None:
    p = params.detect.demo
    rng = np.random.default_rng(p.seed)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for i in range(p.images):
            img, boxes = shapes_scene(rng, p.size)
            img.save(tmp / "images" / f"{i:05d}.png")
            (tmp / "labels" / f"{i:05d}.txt").write_text("".join(yolo_line(*b) for b in boxes))
        (tmp / "data.yaml").write_text(
            "names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(SHAPES))
        )
    log(f"wrote {p.images} shape scenes ({p.size}×{p.size}) → {out_dir}")
