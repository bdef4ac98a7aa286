"""Object detection: the COCO and VOC converters on hand-made samples (tests/detect_helpers.py),
box by box, and pycocotools on hand-made ground truth.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import detect_helpers
import numpy as np
import pandas as pd
import pytest
from conftest import set_params, stage
from detect_helpers import (
    ANT_A,
    ANT_B,
    COCO,
    VOC_XML,
    ZEBRA_A,
    assert_boxes,
    boxes_of,
    no_ultralytics_under,
    prepared_labels,
    read_json,
    voc_xml,
    write_images,
    write_shapes,
    write_voc,
)
from PIL import Image

from stages.detect.boxformats import read_yolo
from stages.detect.evaluate import coco_ground_truth, coco_map

# HOME for every subprocess of this module (detect_helpers.fake_home).
fake_home = pytest.fixture(scope="module", autouse=True)(detect_helpers.fake_home)


@pytest.mark.parametrize("images_param", [False, True], ids=["images_beside", "images_param"])
def test_coco_converter_box_by_box(repo: Path, images_param: bool, fake_home):
    root = repo / "data/coco"
    images = root / ("pictures" if images_param else "images")
    write_images(images)
    (root / "instances.json").write_text(json.dumps(COCO))
    set_params(
        repo,
        {
            "detect.data.source": "data/coco/instances.json",
            "detect.data.format": "coco",
            "detect.data.images": "data/coco/pictures" if images_param else "",
        },
    )
    stage(repo, "prepare", "detect")
    dataset = read_json(repo / "data/prepared/detect/dataset.json")
    assert dataset["names"] == ["zebra", "ant"] and dataset["format"] == "coco"
    assert dataset["boxes_per_class"] == {"zebra": 1, "ant": 2}  # the crowd box is not there
    assert_boxes(boxes_of(repo), {"a": [(0, *ZEBRA_A), (1, *ANT_A)], "b": [(1, *ANT_B)], "c": []})
    table = pd.read_parquet(repo / "data/prepared/detect/images.parquet")
    assert table["has_label"].to_dict() == {
        "a": True,
        "b": True,
        "c": False,
    }  # c: no annotations, a background
    # Converting needs Ultralytics: its settings went to the repo's .cache/, not to $HOME.
    assert (repo / ".cache/ultralytics/Ultralytics/settings.json").exists()
    no_ultralytics_under(fake_home)


def test_voc_converter_box_by_box(repo: Path):
    write_voc(repo / "data/voc")
    set_params(repo, {"detect.data.source": "data/voc", "detect.data.format": "voc"})
    stage(repo, "prepare", "detect")
    dataset = read_json(repo / "data/prepared/detect/dataset.json")
    assert dataset["names"] == ["ant", "zebra"] and dataset["format"] == "voc"  # VOC: names sorted
    # 1-based pixels land on the COCO boxes; the two difficult objects are left out, and counted.
    assert_boxes(boxes_of(repo), {"a": [(1, *ZEBRA_A), (0, *ANT_A)], "b": [(0, *ANT_B)], "c": []})
    assert dataset["voc_difficult_left_out"] == 2


def test_voc_parser_refuses_entity_expansion(repo: Path):
    """Annotations are untrusted: a billion-laughs XML is refused (defusedxml), in one line."""
    root = write_voc(repo / "data/voc")
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        + voc_xml("a", VOC_XML["a"]).replace(
            "<folder>JPEGImages</folder>", "<folder>&lol2;</folder>"
        )
    )
    (root / "Annotations/a.xml").write_text(bomb)
    set_params(repo, {"detect.data.source": "data/voc", "detect.data.format": "voc"})
    res = stage(repo, "prepare", "detect", check=False)
    assert res.returncode == 1
    assert re.search(
        r"^error: data/voc/Annotations/a\.xml: malformed VOC annotation \(EntitiesForbidden",
        res.stderr,
        re.M,
    ), res.stderr


def test_read_yolo_with_a_relative_path(tmp_path: Path):
    data = tmp_path / "datasets" / "shapes"
    (data / "images" / "train").mkdir(parents=True)
    (data / "labels" / "train").mkdir(parents=True)
    for name in ("p", "q"):
        Image.new("RGB", (32, 32)).save(data / "images" / "train" / f"{name}.jpg")
    (data / "labels" / "train" / "p.txt").write_text("1 0.5 0.5 0.25 0.25\n\n0 0.1 0.2 0.1 0.2\n")
    (data / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    config = tmp_path / "configs" / "shapes.yaml"
    config.parent.mkdir()
    config.write_text(
        "path: ../datasets/shapes\ntrain: images/train\nval: images/train\nnames:\n  0: dog\n  1: cat\n"
    )
    images, labels, names, orphans = read_yolo(config)
    assert names == ["dog", "cat"]
    assert {k: v.resolve() for k, v in images.items()} == {
        "train/p": data / "images/train/p.jpg",
        "train/q": data / "images/train/q.jpg",
    }
    assert set(labels) == {"train/p"}  # q has no label file: a background
    assert [(r["line"], r["cls"], r["x"], r["h"]) for r in labels["train/p"]] == [
        (1, 1, 0.5, 0.25),
        (3, 0, 0.1, 0.2),
    ]
    assert [Path(o).resolve() for o in orphans] == [data / "labels/train/orphan.txt"]
    # The same folder without a data.yaml: class names from classes.txt.
    (data / "classes.txt").write_text("dog\ncat\n")
    assert read_yolo(data)[2] == ["dog", "cat"]


def test_prepare_keeps_long_label_lines_whole(repo: Path):
    """Label lines are copied into the prepared split as they are, however long (full
    float precision makes lines of 80+ characters)."""
    labels = write_shapes(repo / "data/long", 6)
    long = "2 0.50000000000000011102 0.50000000000000011102 0.25000000000000011102 1.2500000000000001e-05"
    assert len(long) > 80
    (repo / "data/long/labels/001.txt").write_text(long + "\n")
    labels["001"] = [long]
    set_params(repo, {"detect.data.source": "data/long"})
    stage(repo, "prepare", "detect")
    assert {k: lines for k, (_, lines) in prepared_labels(repo).items()} == labels


# --- pycocotools on hand-made ground truth -------------------------------------------------------

GT = {
    "images": [
        {"id": 1, "file_name": "p.png", "width": 100, "height": 80},
        {"id": 2, "file_name": "q.png", "width": 60, "height": 60},
    ],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [10, 10, 30, 20],
            "area": 600,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 2,
            "bbox": [50, 40, 40, 30],
            "area": 1200,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 1,
            "bbox": [5, 5, 20, 40],
            "area": 800,
            "iscrowd": 0,
        },
    ],
    "categories": [{"id": 1}, {"id": 2}],
}


def perfect() -> list[dict]:
    """The ground truth itself as detections, scores 0.9, 0.8, 0.7 (no ties)."""
    names = {im["id"]: im["file_name"] for im in GT["images"]}
    return [
        {
            "file_name": names[a["image_id"]],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "score": 0.9 - 0.1 * i,
        }
        for i, a in enumerate(GT["annotations"])
    ]


def test_coco_map_perfect_and_shifted():
    assert coco_map(GT, perfect()) == {"mAP50": 1.0, "mAP50-95": 1.0}
    # Class 1's second box (score 0.7, after its hit at 0.9) moved by half its width: IoU 1/3,
    # a miss at every threshold. Class 1's AP is then precision 1 up to recall 0.5, i.e. 51 of
    # COCO's 101 recall points; class 2 is intact.
    half = (51 / 101 + 1) / 2
    shifted = perfect()
    shifted[2]["bbox"][0] += 10
    assert coco_map(GT, shifted) == pytest.approx({"mAP50": half, "mAP50-95": half}, abs=1e-6)
    # Moved by 4 pixels down: IoU 720 / 880 = 0.82, a hit at IoU 0.5 ... 0.8 (7 thresholds), a
    # miss at 0.85, 0.9, 0.95.
    slightly = perfect()
    slightly[2]["bbox"][1] += 4
    assert coco_map(GT, slightly) == pytest.approx(
        {"mAP50": 1.0, "mAP50-95": ((7 + 3 * 51 / 101) / 10 + 1) / 2}, abs=1e-6
    )
    assert coco_map(GT, []) == {"mAP50": 0.0, "mAP50-95": 0.0}


def test_coco_ground_truth_from_yolo_labels(tmp_path: Path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.new("RGB", (100, 80)).save(images / "p.png")
    (labels / "p.txt").write_text("0 0.25 0.25 0.3 0.25\n1 0.7 0.6875 0.4 0.375\n")
    # An upright 60×40 photo stored as 40×60 with EXIF orientation 6 (as phones write them):
    # Ultralytics reads it upright (OpenCV), and its labels are relative to that.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 60)).save(images / "q.png", exif=exif)
    (labels / "q.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    Image.new("RGB", (30, 30)).save(images / "r.png")  # no label file: no boxes
    gt = coco_ground_truth(images, labels, 2)
    assert [(im["file_name"], im["width"], im["height"]) for im in gt["images"]] == [
        ("p.png", 100, 80),
        ("q.png", 60, 40),
        ("r.png", 30, 30),
    ]
    assert [(a["image_id"], a["category_id"]) for a in gt["annotations"]] == [
        (1, 1),
        (1, 2),
        (2, 1),
    ]
    np.testing.assert_allclose(
        [a["bbox"] for a in gt["annotations"]],
        [[10, 10, 30, 20], [50, 40, 40, 30], [15, 10, 30, 20]],
    )
    assert gt["categories"] == [{"id": 1}, {"id": 2}]
