"""demo: scikit-learn's 1,797 handwritten digits (UCI ML, shipped inside scikit-learn),
upscaled to `image.demo.size` pixels as grayscale PNGs in ImageFolder layout.

    python -m stages demo image   # → data/demo/digits/<digit>/<n>.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stages.core import layout
from stages.core.cli import log
from stages.core.files import atomic_dir
from stages.core.schema import Params


def run(params: Params, out_dir: str | Path = layout.DEMO["image"]) -> None:
    from sklearn.datasets import load_digits

    size = params.image.demo.size
    digits = load_digits()
    with atomic_dir(out_dir) as tmp:
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=False)):
            gray = np.round(pixels * (255 / 16)).astype(np.uint8)  # the data is 0..16
            folder = tmp / str(label)
            folder.mkdir(exist_ok=True)
            Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).save(
                folder / f"{i:04d}.png"
            )
    log(f"wrote {len(digits.images)} digits ({size}×{size} PNG) → {out_dir}")
