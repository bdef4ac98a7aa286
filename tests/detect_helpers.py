"""What the detection test modules share: the tiny dataset, its params, a fake HOME that
Ultralytics must not write outside of, and the hand-made COCO and VOC samples.

A 1-epoch YOLO trained from scratch on 16 images is still at its initialisation: its
class scores are the bias priors of its three strides (about 0.0041, 0.0010 and 0.0003
for 3 classes) and every box it predicts covers the whole 64-pixel image. Its mAP is 0
by both scorers. Export parity and inference therefore run at conf 0.002, where each
image gets exactly one box from the stride-32 prior, far from any threshold tie; at
the default 0.25 there would be no box to compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.detect.boxformats import yolo_line
from stages.detect.demo import SHAPES, shapes_scene

SPLITS = ("train", "val", "test")
CONF = 0.002  # between the stride-32 prior (~0.0041) and the stride-16 one (~0.0010): see above
TOLERANCE = 0.01
TINY_DETECT = {
    "detect.data.source": "data/tiny",
    "detect.train.epochs": 1,
    "detect.train.imgsz": 64,
    "detect.train.batch": 8,
    "detect.train.workers": 0,
    "detect.evaluate.coco_tolerance": TOLERANCE,
    "detect.export.conf": CONF,
    "detect.export.min_matched": 0.9,
}
# The home directory Ultralytics must never write to: the subprocesses get a fake one.
HOME_ULTRALYTICS = Path.home() / ".config" / "Ultralytics"


def read_json(path: Path):
    return json.loads(path.read_text())


def write_shapes(root: Path, n: int, size: int = 64, seed: int = 0) -> dict[str, list[str]]:
    """n scenes in YOLO layout (images/*.png, labels/*.txt, data.yaml); returns the label lines."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        img, boxes = shapes_scene(rng, size)
        img.save(root / "images" / f"{i:03d}.png")
        labels[f"{i:03d}"] = [yolo_line(*b).strip() for b in boxes]
        (root / "labels" / f"{i:03d}.txt").write_text("".join(yolo_line(*b) for b in boxes))
    (root / "data.yaml").write_text(
        "names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(SHAPES))
    )
    assert {int(line.split()[0]) for lines in labels.values() for line in lines} == {
        0,
        1,
        2,
    }  # every class has boxes
    return labels


def prepared_labels(repo: Path) -> dict[str, tuple[str, list[str]]]:
    """{image stem: (split, label lines)} of data/prepared/detect."""
    out = {}
    for split in SPLITS:
        for f in sorted((repo / "data/prepared/detect/labels" / split).glob("*.txt")):
            out[f.stem] = (split, f.read_text().splitlines())
    return out


def home_state() -> tuple | None:
    """What ~/.config/Ultralytics looks like now (None: absent)."""
    if not HOME_ULTRALYTICS.exists():
        return None
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in HOME_ULTRALYTICS.rglob("*")))


def fake_home(tmp_path_factory):
    """HOME (and no XDG_CONFIG_HOME / YOLO_CONFIG_DIR) for every subprocess of this module:
    anything Ultralytics wrote outside the repo would show up there."""
    home = tmp_path_factory.mktemp("home")
    before = home_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.delenv("XDG_CONFIG_HOME", raising=False)
        mp.delenv("YOLO_CONFIG_DIR", raising=False)
        yield home
    assert home_state() == before, "~/.config/Ultralytics was written while testing"


def no_ultralytics_under(home: Path) -> None:
    assert not [p for p in home.rglob("*") if "ultralytics" in p.name.lower()]


# --- the COCO and VOC converters, box by box --------------------------------------------------

# Three images; b has a box at fractional pixels; c has no object (a background).
SIZES = {"a": (40, 30), "b": (64, 32), "c": (20, 50)}
# COCO category ids 3 ("zebra") and 7 ("ant"): class ids follow the id order, so zebra = 0, ant = 1.
COCO = {
    "images": [
        {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 20, "file_name": "b.png", "width": 64, "height": 32},
        {"id": 30, "file_name": "c.png", "width": 20, "height": 50},
    ],
    "annotations": [
        {
            "id": 1,
            "image_id": 10,
            "category_id": 3,
            "bbox": [4, 6, 10, 12],
            "area": 120,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 10,
            "category_id": 7,
            "bbox": [20, 0, 20, 30],
            "area": 600,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 10,
            "category_id": 3,
            "bbox": [0, 0, 5, 5],
            "area": 25,
            "iscrowd": 1,
        },  # skipped
        {
            "id": 5,
            "image_id": 20,
            "category_id": 7,
            "bbox": [0.5, 1.5, 31, 8.25],
            "area": 255.75,
            "iscrowd": 0,
        },
    ],
    "categories": [
        {"id": 7, "name": "ant"},
        {"id": 3, "name": "zebra"},
    ],  # listed out of order on purpose
}
# The same boxes, worked out by hand: (centre x, centre y, width, height) / image size.
#   a, zebra [4, 6, 10, 12] in 40×30:   x (4 + 5) / 40 = 0.225, y (6 + 6) / 30 = 0.4, w 10/40, h 12/30
#   a, ant   [20, 0, 20, 30]:           x 30/40 = 0.75, y 15/30 = 0.5, w 0.5, h 1.0
#   b, ant   [0.5, 1.5, 31, 8.25] in 64×32: x 16/64 = 0.25, y 5.625/32 = 0.17578125, w 31/64, h 8.25/32
ZEBRA_A = (0.225, 0.4, 0.25, 0.4)
ANT_A = (0.75, 0.5, 0.5, 1.0)
ANT_B = (0.25, 0.17578125, 0.484375, 0.2578125)
VOC_XML = {  # xmin, ymin, xmax, ymax: the same boxes in VOC's 1-based inclusive pixels (xmin - 1 = COCO's x)
    "a": [
        ("zebra", 5, 7, 14, 18),
        ("ant", 21, 1, 40, 30),
        ("zebra", 1, 1, 3, 3, 1),
    ],  # the last one: difficult
    "b": [("ant", 1.5, 2.5, 31.5, 9.75)],
    "c": [("zebra", 2, 2, 9, 9, 1)],  # only a difficult object: a background for training
}


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(folder / f"{name}.png")


def voc_xml(name: str, objects) -> str:
    w, h = SIZES[name]
    objs = "".join(
        f"<object><name>{n}</name><difficult>{hard[0] if hard else 0}</difficult><bndbox><xmin>{x0}</xmin>"
        f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for n, x0, y0, x1, y1, *hard in objects
    )
    return (
        f"<annotation><folder>JPEGImages</folder><filename>{name}.png</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def write_voc(root: Path) -> Path:
    write_images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    for name, objects in VOC_XML.items():
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(name, objects))
    return root


def boxes_of(repo: Path) -> dict[str, list[tuple]]:
    """{image: [(class id, x, y, w, h), ...]} from the prepared label files."""
    return {
        k: [(int(v.split()[0]), *map(float, v.split()[1:])) for v in lines]
        for k, (_, lines) in prepared_labels(repo).items()
    }


def assert_boxes(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for image, boxes in expected.items():
        assert len(got[image]) == len(boxes), (image, got[image])
        for g, e in zip(sorted(got[image]), sorted(boxes), strict=False):
            assert g[0] == e[0] and g[1:] == pytest.approx(e[1:], abs=1e-5), (image, g, e)
