"""demo: write the bundled demo data that has to be generated, deterministically.

    python -m stages.demo image   # scikit-learn's 8×8 handwritten digits → data/demo/digits/<digit>/<n>.png

1,797 real digits (UCI ML hand-written digits, shipped inside scikit-learn), upscaled to
`image.demo.size` pixels as grayscale PNGs in ImageFolder layout.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from stages.common import atomic_dir, log, run_stage


def demo_image(params: dict, out_dir: str = "data/demo/digits") -> None:
    from sklearn.datasets import load_digits

    size = params["image"]["demo"]["size"]
    digits = load_digits()
    with atomic_dir(out_dir) as tmp:
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            gray = np.round(pixels * (255 / 16)).astype(np.uint8)  # the data is 0..16
            folder = tmp / str(label)
            folder.mkdir(exist_ok=True)
            Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
    log(f"wrote {len(digits.images)} digits ({size}×{size} PNG) → {out_dir}")


if __name__ == "__main__":
    run_stage({"image": demo_image})
