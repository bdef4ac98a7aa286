"""Object detection: `dvc repro infer@detect` on a tiny generated dataset (Ultralytics YOLO
for one epoch, pycocotools, ONNX, onnxruntime), the COCO and VOC converters on hand-made
samples, the torch-free pre/post-processing against OpenCV, Ultralytics and torchvision,
and bad inputs through the real stage CLI.

A 1-epoch YOLO trained from scratch on 16 images is still at its initialisation: its
class scores are the bias priors of its three strides (about 0.0041, 0.0010 and 0.0003
for 3 classes) and every box it predicts covers the whole 64-pixel image. Its mAP is 0
by both scorers. Export parity and inference therefore run at conf 0.002, where each
image gets exactly one box from the stride-32 prior, far from any threshold tie; at
the default 0.25 there would be no box to compare.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_repo, run, run_python, set_params, stage
from PIL import Image

from stages.detect.boxes import decode, letterbox, load_for_detection, nms, resize_bilinear
from stages.detect.demo import SHAPES, shapes_scene
from stages.detect.evaluate import coco_ground_truth, coco_map
from stages.detect.labels import read_yolo, yolo_line

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


@pytest.fixture(scope="module", autouse=True)
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


# --- end to end: dvc repro infer@detect on 24 tiny scenes ---------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, fake_home):
    """A repo copy in which `dvc repro infer@detect` ran once on 24 generated 64×64 scenes."""
    repo = copy_repo(tmp_path_factory.mktemp("detect_e2e") / "repo")
    labels = write_shapes(repo / "data/tiny", 24)
    set_params(repo, TINY_DETECT)
    res = run(repo, "dvc", "repro", "infer@detect", timeout=400)
    return repo, labels, res.stdout


@pytest.mark.slow
def test_repro_runs_the_detect_chain(e2e, fake_home):
    repo, labels, stdout = e2e
    for name in ("prepare", "validate", "train", "evaluate", "export", "infer"):
        assert f"Running stage '{name}@detect'" in stdout
    assert "demo@detect" not in stdout  # the source is ours, not the demo shapes
    # Ultralytics' label caches stay in .cache/, so prepare's DVC output is untouched afterwards.
    assert not list((repo / "data").rglob("*.cache"))
    assert list(
        (repo / ".cache/detect/dataset/labels").glob("*.cache")
    )  # ... they were written, there
    status = run(repo, "dvc", "status", "infer@detect", "--with-deps").stdout
    assert "Data and pipelines are up to date" in status, status
    # Its own integrations are off and its settings, runs and weights stay in .cache/.
    assert not (repo / "dvclive").exists() and not (repo / "runs").exists()
    settings = read_json(repo / ".cache/ultralytics/Ultralytics/settings.json")
    assert settings["dvc"] is False and settings["sync"] is False
    assert Path(settings["runs_dir"]) == (repo / ".cache/ultralytics/runs").resolve()
    no_ultralytics_under(fake_home)


@pytest.mark.slow
def test_prepare_outputs(e2e):
    repo, labels, _ = e2e
    prepared = repo / "data/prepared/detect"
    got = prepared_labels(repo)
    # Every image is in one split, with its own label lines, unchanged.
    assert {k: lines for k, (_, lines) in got.items()} == labels
    for split in SPLITS:
        images = sorted(f.stem for f in (prepared / "images" / split).iterdir())
        assert images and images == sorted(k for k, (s, _) in got.items() if s == split)
    dataset = read_json(prepared / "dataset.json")
    assert dataset["names"] == SHAPES and dataset["format"] == "yolo"
    assert dataset["rows"] == {"train": 16, "val": 4, "test": 4}
    n_boxes = sum(len(v) for v in labels.values())
    assert sum(dataset["boxes_per_class"].values()) == n_boxes
    images = pd.read_parquet(prepared / "images.parquet")
    assert len(images) == 24 and images["error"].isna().all() and images["has_label"].all()
    assert (images["width"] == 64).all() and images["boxes"].sum() == n_boxes
    boxes = pd.read_parquet(prepared / "boxes.parquet")
    assert (
        len(boxes) == n_boxes
        and (boxes["fields"] == 5).all()
        and set(boxes["class_name"]) == set(SHAPES)
    )
    assert boxes.index[0] == "000:1"  # rows are image:line

    validation = read_json(repo / "metrics/detect/validation.json")
    assert validation["success"] is True and set(validation["tables"]) == {
        "images/all",
        "boxes/all",
    }
    assert (repo / "data/expectations/detect/tiny.images.json").exists()
    assert (repo / "data/expectations/detect/tiny.boxes.json").exists()


@pytest.mark.slow
def test_train_and_evaluate_outputs(e2e):
    repo, _, _ = e2e
    assert (repo / "models/detect/model.pt").stat().st_size > 1_000_000
    rows = (repo / "metrics/detect/train/plots/metrics/mAP50.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "mAP50"] and len(rows) == 2  # one epoch, one row
    metrics = read_json(repo / "metrics/detect/metrics.json")
    test = metrics["test"]
    for key in ("mAP50", "mAP50-95", "precision", "recall"):
        assert 0.0 <= test[key] <= 1.0, key
    assert set(test["per_class"]) <= set(SHAPES) and test["per_class"]
    for ap in test["per_class"].values():
        assert set(ap) == {"ap50", "ap50_95"} and 0 <= ap["ap50_95"] <= ap["ap50"] <= 1
    coco = metrics["pycocotools"]
    assert set(coco) == {"mAP50", "mAP50-95"} and all(0.0 <= v <= 1.0 for v in coco.values())
    assert metrics["tolerance"] == TOLERANCE and metrics["test_images"] == 4
    for key in ("mAP50", "mAP50-95"):
        assert metrics["ultralytics_minus_pycocotools"][key] == pytest.approx(
            test[key] - coco[key], abs=1e-4
        )
        assert abs(test[key] - coco[key]) <= metrics["tolerance"]
    pr = read_json(repo / "metrics/detect/plots/pr.json")
    assert pr and all(0 <= r["recall"] <= 1 and 0 <= r["precision"] <= 1 for r in pr)
    per_class = read_json(repo / "metrics/detect/plots/per_class_ap.json")
    assert [r["class"] for r in per_class] == list(test["per_class"])


@pytest.mark.slow
def test_pycocotools_numbers_are_recomputable(e2e):
    """The pycocotools numbers in metrics.json are those of the validator's own predictions
    against the prepared test labels."""
    repo, _, _ = e2e
    prepared = repo / "data/prepared/detect"
    predictions = read_json(repo / ".cache/detect/runs/evaluate/predictions.json")
    assert predictions  # at conf 0.001 the untrained model still predicts boxes
    test_files = {f.name for f in (prepared / "images/test").iterdir()}
    assert {p["file_name"] for p in predictions} <= test_files
    ground_truth = coco_ground_truth(
        prepared / "images/test", prepared / "labels/test", len(SHAPES)
    )
    assert len(ground_truth["images"]) == 4
    assert len(ground_truth["annotations"]) == sum(
        len(v[1]) for v in prepared_labels(repo).values() if v[0] == "test"
    )
    got = coco_map(ground_truth, predictions)
    assert got == pytest.approx(
        read_json(repo / "metrics/detect/metrics.json")["pycocotools"], abs=1e-9
    )


@pytest.mark.slow
def test_onnx_model_and_card(e2e):
    import onnxruntime as ort

    repo, _, _ = e2e
    path = repo / "models/detect/model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert isinstance(shape[0], str) and shape[1:] == [3, 64, 64]
    files = sorted((repo / "data/prepared/detect/images/test").iterdir())[:3]
    x = np.stack([load_for_detection(f, 64)[0] for f in files])
    name = session.get_inputs()[0].name
    three = session.run(None, {name: x})[0]
    assert three.shape == (
        3,
        4 + len(SHAPES),
        8 * 8 + 4 * 4 + 2 * 2,
    )  # anchors of strides 8, 16, 32
    for i in range(3):
        one = session.run(None, {name: x[i : i + 1]})[0]
        np.testing.assert_allclose(one[0], three[i], atol=1e-4)

    card = read_json(repo / "models/detect/model.json")
    assert card["task"] == "detect" and card["kind"] == "detection" and card["classes"] == SHAPES
    assert card["onnx"]["input_shape"] == ["batch", 3, 64, 64]
    assert card["onnx"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["metrics"] == read_json(repo / "metrics/detect/metrics.json")
    assert card["validation"]["success"] is True and card["preprocessing"]["imgsz"] == 64
    assert (
        card["training"]["epochs"] == 1
        and card["training"]["imgsz"] == 64
        and card["training"]["batch"] == 8
    )
    parity = card["parity"]
    assert parity["images"] == 4  # the val split
    assert parity["boxes_ultralytics"] > 0 and parity["boxes_onnx"] > 0
    assert min(parity["matched_of_ultralytics"], parity["matched_of_onnx"]) >= 0.9
    assert card["postprocessing"]["conf"] == CONF


@pytest.mark.slow
def test_infer_outputs(e2e):
    from stages.core.inference import open_session
    from stages.detect.export import detections_onnx

    repo, _, _ = e2e
    preds = read_json(repo / "data/predictions/detect.json")
    assert isinstance(preds, list) and preds
    test_dir = repo / "data/prepared/detect/images/test"
    files = sorted(f.name for f in test_dir.iterdir())
    assert {p["file"] for p in preds} == set(files)  # at conf 0.002 every image gets its prior box
    for p in preds:
        assert set(p) == {"file", "category_id", "category", "bbox", "score"}
        assert (
            p["file"] in files and p["category"] == SHAPES[p["category_id"]] and p["score"] > CONF
        )
        x, y, w, h = p["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 64 + 0.01 and y + h <= 64 + 0.01
    # The same detections as our per-image path (infer runs batches of 16).
    direct = detections_onnx(
        open_session(repo / "models/detect/model.onnx"),
        [test_dir / f for f in files],
        64,
        CONF,
        0.7,
    )
    expected = [
        (f, int(d[5]), [round(float(v), 2) for v in (d[0], d[1], d[2] - d[0], d[3] - d[1])])
        for f, dets in zip(files, direct, strict=False)
        for d in dets
    ]
    assert [(p["file"], p["category_id"], p["bbox"]) for p in preds] == [
        (f, c, pytest.approx(b, abs=0.02)) for f, c, b in expected
    ]
    stats = read_json(repo / "metrics/detect/infer.json")
    assert stats["images"] == 4 and stats["failed"] == 0 and stats["errors"] == []
    assert stats["detections"] == len(preds) and "images_per_s" not in stats
    assert read_json(repo / ".cache/timings/infer-detect.json")["images_per_s"] > 0
    assert sorted(p.name for p in (repo / "data/predictions/detect_rendered").iterdir()) == files


@pytest.fixture
def trained(e2e, tmp_path):
    """This test's own copy of the end-to-end repo (models and all)."""
    return shutil.copytree(e2e[0], tmp_path / "repo", symlinks=True)


def truncated_png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    path.write_bytes(path.read_bytes()[:300])
    return path


@pytest.mark.slow
def test_infer_skips_unreadable_files_and_imports_no_torch(trained, fake_home):
    folder = trained / "data/new"
    (folder / "sub").mkdir(parents=True)
    test_images = sorted((trained / "data/prepared/detect/images/test").iterdir())
    shutil.copy(test_images[0], folder / "a.png")
    shutil.copy(test_images[1], folder / "sub" / "b.png")
    Image.open(test_images[2]).convert("RGB").save(folder / "c.jpg", quality=95)
    truncated_png(folder / "broken.png")
    (folder / "x.jpg").write_text("not an image\n")
    set_params(trained, {"detect.infer.source": "data/new"})

    res = stage(trained, "infer", "detect")
    assert "2 could not be read (see metrics/detect/infer.json)" in res.stderr
    stats = read_json(trained / "metrics/detect/infer.json")
    assert stats["images"] == 3 and stats["failed"] == 2
    errors = {e["file"]: e["error"] for e in stats["errors"]}
    assert set(errors) == {"broken.png", "x.jpg"}
    assert "truncated" in errors["broken.png"] and errors["x.jpg"].startswith(
        "UnidentifiedImageError"
    )
    preds = read_json(trained / "data/predictions/detect.json")
    assert sorted({p["file"] for p in preds}) == [
        "a.png",
        "c.jpg",
        "sub/b.png",
    ]  # one box each at conf 0.002
    assert sorted(p.name for p in (trained / "data/predictions/detect_rendered").iterdir()) == [
        "a.png",
        "c.png",
        "sub__b.png",
    ]

    # The same, in one process that must not have imported torch, torchvision, ultralytics or OpenCV.
    out = trained / "direct.json"
    code = (
        "import sys; from pathlib import Path; from stages.core.params import load_params; "
        f"from stages.detect.infer import run; run(load_params(), out=Path({str(out)!r})); "
        "bad = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'torchvision', 'ultralytics', 'cv2')); "
        "assert not bad, bad; print('ok')"
    )
    assert run_python(trained, code, timeout=120).stdout.strip().endswith("ok")
    assert read_json(out) == preds
    no_ultralytics_under(fake_home)


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


# --- the numpy inference helpers against OpenCV, Ultralytics, torchvision -----------------------


@pytest.mark.parametrize(
    "src,dst",
    [
        ((37, 53), (101, 77)),
        ((101, 77), (37, 53)),
        ((64, 64), (32, 32)),
        ((33, 65), (64, 127)),
        ((7, 9), (3, 2)),
        ((3, 300), (1, 64)),
        ((99, 99), (33, 33)),
        ((20, 20), (20, 20)),
    ],
)
def test_resize_bilinear_matches_opencv(src, dst):
    import cv2

    img = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), dtype=np.uint8)
    got = resize_bilinear(img, dst[1], dst[0])
    ref = cv2.resize(img, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref).max() <= 1  # OpenCV rounds with 11-bit fixed-point weights


@pytest.fixture(scope="module")
def ultralytics_letterbox(tmp_path_factory):
    """Ultralytics' LetterBox, imported with its settings in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo_config")))
        from ultralytics.data.augment import LetterBox
    return LetterBox


@pytest.mark.parametrize(
    "shape", [(48, 80), (80, 48), (37, 53), (200, 120), (64, 64), (2, 300), (300, 2)]
)
@pytest.mark.parametrize("size", [64, 63])
def test_letterbox_matches_ultralytics(ultralytics_letterbox, shape, size):
    img = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ref = ultralytics_letterbox(new_shape=(size, size), auto=False, scale_fill=False, center=True)(
        image=img
    )
    got, r, (left, top) = letterbox(img, size)
    assert got.shape == ref.shape == (size, size, 3)
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert r == min(size / shape[0], size / shape[1])
    # The returned offsets are where the image starts: all 114 before them.
    assert (got[:top] == 114).all() and (got[:, :left] == 114).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_for_detection_reads_images_upright_as_ultralytics(
    ultralytics_letterbox, tmp_path, orientation
):
    """A photo with an EXIF orientation: Ultralytics reads it with OpenCV, upright; so must we."""
    import cv2

    rgb = np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path, exif=exif)
    bgr = cv2.imread(str(path))
    ref = ultralytics_letterbox(new_shape=(64, 64), auto=False, center=True)(image=bgr)[..., ::-1]
    x, meta = load_for_detection(path, 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert np.abs(np.round(x.transpose(1, 2, 0) * 255).astype(int) - ref).max() <= 1
    assert (meta["height"], meta["width"]) == bgr.shape[:2]


def test_nms_matches_torchvision():
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    for n, iou in ((1, 0.5), (50, 0.3), (300, 0.5), (300, 0.7), (1000, 0.45)):
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2))], axis=1)
        scores = rng.uniform(0, 1, n)
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        got = nms(boxes, scores, iou)
        assert got.tolist() == ref.tolist(), (n, iou)
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_decode_a_hand_built_output():
    # A 100×50 image letterboxed into 64: scale 0.64, 64×32 pixels, 16 rows of padding on top.
    _, r, pad = letterbox(np.zeros((50, 100, 3), np.uint8), 64)
    assert (r, pad) == (0.64, (0, 16))
    meta = {"scale": r, "pad": pad, "width": 100, "height": 50}
    anchors = [  # cx, cy, w, h in letterboxed pixels; score of class 0, class 1
        (32, 32, 20, 10, 0.05, 0.90),  # kept: class 1
        (33, 32, 20, 10, 0.10, 0.80),  # IoU 0.9 with the first, same class: suppressed
        (32, 32, 20, 10, 0.70, 0.01),  # the first box again, class 0: kept (NMS is per class)
        (50, 40, 10, 10, 0.20, 0.24),  # under conf 0.25: dropped
        (2, 20, 10, 10, 0.50, 0.30),  # sticks out of the image: clipped to it
    ]
    output = np.array(anchors, np.float32).T  # (4 + classes, anchors), as the model writes it
    got = decode(output, meta, conf=0.25, iou=0.7)
    expected = [
        [22 / 0.64, 11 / 0.64, 42 / 0.64, 21 / 0.64, 0.90, 1],
        [22 / 0.64, 11 / 0.64, 42 / 0.64, 21 / 0.64, 0.70, 0],
        [0, 0, 7 / 0.64, 9 / 0.64, 0.50, 0],
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        decode(output, meta, conf=0.25, iou=0.7, max_det=2), expected[:2], atol=1e-5
    )
    assert decode(output, meta, conf=0.95, iou=0.7).shape == (0, 6)


# --- bad inputs through the real stage CLI -------------------------------------------------------


def one_line_error(res, *patterns: str) -> str:
    err = res.stderr
    assert res.returncode == 1, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{err}"
    assert (
        "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    ), err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
    return err


def _wrong_fields(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("1 0.5 0.5 0.2\n")


def _class_out_of_range(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("3 0.5 0.5 0.2 0.2\n")


def _outside(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("0 1.25 0.5 0.2 0.2\n")


def _zero_width(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("0 0.5 0.5 0 0.2\n")


def _not_an_image(root):
    (root / "images/004.png").write_text("not a png\n")


def _label_without_image(root):
    (root / "labels/zzz.txt").write_text("0 0.5 0.5 0.2 0.2\n")


def line_after(root: Path) -> int:
    return len((root / "labels/002.txt").read_text().splitlines())


# id: (break the dataset, failing (table, expectation, column), expected sample value, row label)
VALIDATE_CASES = {
    "wrong_fields": (
        _wrong_fields,
        {
            ("boxes/all", "expect_column_values_to_be_in_set", "fields"),
            ("boxes/all", "expect_column_values_to_not_be_null", "class_name"),
        },
        "4",
        "002:{n}",
    ),
    "class_out_of_range": (
        _class_out_of_range,
        {
            ("boxes/all", "expect_column_values_to_be_between", "cls"),
            ("boxes/all", "expect_column_values_to_not_be_null", "class_name"),
        },
        "3.0",
        "002:{n}",
    ),
    "coordinate_outside": (
        _outside,
        {("boxes/all", "expect_column_values_to_be_between", "x")},
        "1.25",
        "002:{n}",
    ),
    "zero_width": (
        _zero_width,
        {("boxes/all", "expect_column_values_to_be_between", "w")},
        "0.0",
        "002:{n}",
    ),
    "not_an_image": (
        _not_an_image,
        {("images/all", "expect_column_values_to_be_null", "error")},
        "\"UnidentifiedImageError: cannot identify image file 'data/bad/images/004.png'\"",
        "004",
    ),
    "label_without_image": (
        _label_without_image,
        {("images/all", "expect_column_values_to_be_in_set", "has_image")},
        "False",
        "(label) data/bad/labels/zzz.txt",
    ),
}


@pytest.mark.parametrize("case", VALIDATE_CASES)
def test_validate_names_the_bad_label_or_image(repo: Path, case: str):
    """Broken labels and images are recorded by prepare and stop the pipeline at validate,
    which names the expectation, the column, the value and the image (and label line)."""
    make, failing, value, row = VALIDATE_CASES[case]
    root = repo / "data/bad"
    write_shapes(root, 6)
    make(root)
    row = row.format(n=line_after(root))
    set_params(repo, {"detect.data.source": "data/bad"})
    stage(repo, "prepare", "detect")
    res = stage(repo, "validate", "detect", check=False)
    err = res.stderr
    assert res.returncode == 1 and "Traceback" not in err, err
    # The first run on a source creates its suites (one line saying so), then checks them.
    assert err.startswith(
        "created data/expectations/detect/bad.images.json and "
        "data/expectations/detect/bad.boxes.json from params.yaml detect.validate"
    ), err
    err = err.split("\n", 1)[1]
    assert err.startswith(
        "error: data does not meet the expectations in data/expectations/detect/bad.images.json "
        "and data/expectations/detect/bad.boxes.json\n"
    ), err
    assert len(err.splitlines()) == 3 + len(failing), (
        err
    )  # the error, the table, each expectation, what to do
    table, expectation, column = sorted(failing)[0]
    assert re.search(
        rf"{re.escape(table)} \(data/bad (images \(rows: image\)|labels \(rows: image:line\))\)",
        err,
    ), err
    assert re.search(
        rf"- {expectation} on column {column!r} .*: 1 unexpected, e\.g\. {re.escape(value)}.* "
        rf"\(row {re.escape(row)}\)",
        err,
    ), err
    report = read_json(repo / "metrics/detect/validation.json")
    assert report["success"] is False
    got = {
        (name, r["expectation"], r["column"])
        for name, t in report["tables"].items()
        for r in t["results"]
        if not r["success"]
    }
    assert got == failing
    assert all(
        row in r.get("sample_rows", [row])
        for t in report["tables"].values()
        for r in t["results"]
        if not r["success"]
    )


def test_validate_control_passes(repo: Path):
    """The control for the cases above: the untouched dataset validates."""
    write_shapes(repo / "data/bad", 6)
    set_params(repo, {"detect.data.source": "data/bad"})
    stage(repo, "prepare", "detect")
    stage(repo, "validate", "detect")
    assert read_json(repo / "metrics/detect/validation.json")["success"] is True


def _empty(repo):
    root = repo / "data/empty"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names: [a, b]\n")
    return {"detect.data.source": "data/empty"}, [r"^error: data/empty: the dataset has no images$"]


def _coco_missing_images(repo):
    write_images(repo / "data/coco/images")
    (repo / "data/coco/images/b.png").unlink()
    coco = {
        **COCO,
        "images": COCO["images"] + [{"id": 40, "file_name": "gone.png", "width": 8, "height": 8}],
    }
    (repo / "data/coco/instances.json").write_text(json.dumps(coco))
    return (
        {"detect.data.source": "data/coco/instances.json", "detect.data.format": "coco"},
        [
            r"^error: data/coco/instances\.json: 2 of 4 images are not in data/coco/images, "
            r"e\.g\. b\.png, gone\.png$"
        ],
    )


def _voc_malformed(repo):
    root = write_voc(repo / "data/voc")
    (root / "Annotations/b.xml").write_text(voc_xml("b", VOC_XML["b"]).replace("</annotation>", ""))
    return (
        {"detect.data.source": "data/voc", "detect.data.format": "voc"},
        [r"^error: data/voc/Annotations/b\.xml: malformed VOC annotation \(ParseError: .*line 1"],
    )


def _voc_no_size(repo):
    root = write_voc(repo / "data/voc")
    (root / "Annotations/a.xml").write_text(
        re.sub(r"<size>.*</size>", "", voc_xml("a", VOC_XML["a"]))
    )
    return (
        {"detect.data.source": "data/voc", "detect.data.format": "voc"},
        [r"^error: data/voc/Annotations/a\.xml: malformed VOC annotation \(TypeError"],
    )


def _unknown_format(repo):
    write_shapes(repo / "data/tiny", 3)
    return (
        {"detect.data.source": "data/tiny", "detect.data.format": "kitti"},
        [r"^error: detect\.data\.format is 'kitti'; choose one of: yolo, coco, voc$"],
    )


def _no_names(repo):
    write_shapes(repo / "data/tiny", 3)
    (repo / "data/tiny/data.yaml").unlink()
    return {"detect.data.source": "data/tiny"}, [r"^error: data/tiny: no class names"]


PREPARE_CASES = {
    "empty_dataset": _empty,
    "coco_missing_images": _coco_missing_images,
    "voc_malformed": _voc_malformed,
    "voc_without_size": _voc_no_size,
    "unknown_format": _unknown_format,
    "no_class_names": _no_names,
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare_rejects_bad_dataset(repo: Path, case: str):
    params, patterns = PREPARE_CASES[case](repo)
    set_params(repo, params)
    one_line_error(stage(repo, "prepare", "detect", check=False), *patterns)
    assert not (repo / "data/prepared/detect").exists()  # nothing half-written
