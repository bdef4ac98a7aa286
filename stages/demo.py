"""demo: write the bundled demo data that has to be generated, deterministically.

    python -m stages.demo image   # scikit-learn's 8×8 handwritten digits → data/demo/digits/<digit>/<n>.png
    python -m stages.demo detect  # synthetic shapes scenes → data/demo/shapes/{images,labels}/, data.yaml

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


def demo_detect(params: dict, out_dir: str = "data/demo/shapes") -> None:
    """Circles, squares and triangles on textured backgrounds, in YOLO layout."""
    from stages.detect import SHAPES, shapes_scene, yolo_line

    p = params["detect"]["demo"]
    rng = np.random.default_rng(p["seed"])
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for i in range(p["images"]):
            img, boxes = shapes_scene(rng, p["size"])
            img.save(tmp / "images" / f"{i:05d}.png")
            (tmp / "labels" / f"{i:05d}.txt").write_text("".join(yolo_line(*b) for b in boxes))
        (tmp / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(SHAPES)))
    log(f"wrote {p['images']} shape scenes ({p['size']}×{p['size']}) → {out_dir}")


if __name__ == "__main__":
    run_stage({"image": demo_image, "detect": demo_detect})
