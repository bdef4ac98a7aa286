"""Object detection end to end: `dvc repro infer@detect` on a tiny generated dataset
(Ultralytics YOLO for one epoch, pycocotools, ONNX, onnxruntime), batch infer, and batch
infer and serving at the same thresholds. Why conf 0.002: tests/detect_helpers.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import detect_helpers
import numpy as np
import pandas as pd
import pytest
from conftest import copy_repo, run, run_python, set_params, stage
from detect_helpers import (
    CONF,
    SPLITS,
    TINY_DETECT,
    TOLERANCE,
    no_ultralytics_under,
    prepared_labels,
    read_json,
    write_shapes,
)
from PIL import Image

from stages.detect.boxes import load_for_detection
from stages.detect.demo import SHAPES
from stages.detect.evaluate import coco_ground_truth, coco_map

# HOME for every subprocess of this module (detect_helpers.fake_home).
fake_home = pytest.fixture(scope="module", autouse=True)(detect_helpers.fake_home)


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


@pytest.mark.slow
def test_batch_infer_and_serving_use_the_same_thresholds(e2e, trained, fake_home):
    """Both read conf and iou from the card: change them there (to values no params key
    holds) and batch infer and the app's detect endpoint still find the same boxes."""
    from app.predict import predict_detect
    from app.repository import load_models
    from app.settings import load_settings

    card_path = trained / "models/detect/model.json"
    card = read_json(card_path)
    card["postprocessing"].update(conf=0.0005, iou=0.5)  # below the stride-16 prior: more boxes
    card_path.write_text(json.dumps(card))
    stage(trained, "infer", "detect")
    batch = read_json(trained / "data/predictions/detect.json")
    assert len(batch) > len(read_json(e2e[0] / "data/predictions/detect.json"))  # it took effect

    models, _ = load_models(trained / "models", load_settings(trained / "params.yaml"))
    test_dir = trained / "data/prepared/detect/images/test"
    served = [
        {"file": f.name, **d}
        for f in sorted(test_dir.iterdir())
        for d in predict_detect(models["detect"], f.read_bytes(), None, None, 10**8)["detections"]
    ]
    assert sorted((d["file"], d["category_id"], d["bbox"]) for d in served) == sorted(
        (d["file"], d["category_id"], d["bbox"]) for d in batch
    )


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
