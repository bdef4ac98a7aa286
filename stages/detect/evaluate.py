"""evaluate: Ultralytics' validator on the test split, and the same predictions scored again
by pycocotools; a disagreement beyond detect.evaluate.coco_tolerance is a warning in the
metrics (and so the report and the card) with the size the test set explains, never a stop.

    python -m stages evaluate detect
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.core import layout
from stages.core.cli import log
from stages.core.files import read_json, write_json
from stages.core.metrics import fail_if_untrained, learned_nothing
from stages.core.schema import Params
from stages.detect import yolo
from stages.detect.boxes import upright_size
from stages.detect.boxformats import parse_yolo_label


def coco_ground_truth(images_dir: Path, labels_dir: Path, n_classes: int) -> dict:
    """The YOLO labels of a split as a COCO ground-truth dict (ids 1..N in file order)."""
    from PIL import Image

    images, anns = [], []
    for i, f in enumerate(sorted(p for p in images_dir.iterdir() if p.is_file()), start=1):
        with Image.open(f) as im:
            w, h = upright_size(
                im
            )  # Ultralytics (OpenCV) labels and predicts the EXIF-rotated image
        images.append({"id": i, "file_name": f.name, "width": w, "height": h})
        label = labels_dir / f"{f.stem}.txt"
        for row in parse_yolo_label(label) if label.exists() else []:
            bw, bh = row["w"] * w, row["h"] * h
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(row["cls"]) + 1,
                    "iscrowd": 0,
                    "bbox": [row["x"] * w - bw / 2, row["y"] * h - bh / 2, bw, bh],
                    "area": bw * bh,
                }
            )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c + 1} for c in range(n_classes)],
    }


def coco_map(ground_truth: dict, predictions: list[dict]) -> dict:
    """pycocotools' COCOeval (bbox) of predictions whose `file_name` names a ground-truth image."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {im["file_name"]: im["id"] for im in ground_truth["images"]}
    dets = [{**d, "image_id": ids[d["file_name"]]} for d in predictions]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        result = COCOeval(gt, gt.loadRes(dets) if dets else COCO(), "bbox")
        result.evaluate()
        result.accumulate()
        result.summarize()
    # pycocotools says -1 when the split has no boxes at all; Ultralytics says 0.
    return {"mAP50-95": max(float(result.stats[0]), 0.0), "mAP50": max(float(result.stats[1]), 0.0)}


def _scores(box, names: list[str]) -> tuple[dict, dict]:
    """Ultralytics' box metrics → ({mAP50, mAP50-95, precision, recall}, {class: ap50, ap50_95})."""
    per_class = {
        names[int(c)]: {"ap50": float(box.ap50[i]), "ap50_95": float(box.ap[i])}
        for i, c in enumerate(box.ap_class_index)
    }
    ours = {
        "mAP50": float(box.map50),
        "mAP50-95": float(box.map),
        "precision": float(box.mp),
        "recall": float(box.mr),
    }
    return ours, per_class


def _write_plots(plots: Path, box, names: list[str], per_class: dict) -> None:
    """The PR curve (mean over classes and per class, at most ~100 points) and AP per class."""
    px, curves = box.curves_results[0][0], np.asarray(box.curves_results[0][1])
    step = max(1, len(px) // 100)
    write_json(
        plots / "pr.json",
        [
            {
                "recall": float(px[j]),
                "precision": float(curves[:, j].mean()) if curves.size else 0.0,
                **{names[int(c)]: float(curves[i, j]) for i, c in enumerate(box.ap_class_index)},
            }
            for j in range(0, len(px), step)
        ],
    )
    write_json(
        plots / "per_class_ap.json",
        [{"class": n, "ap50": v["ap50"], "ap50_95": v["ap50_95"]} for n, v in per_class.items()],
    )


def explained_gap(truth: dict) -> float:
    """How far two implementations of one mAP can differ on this test set from interpolation
    alone: a class's precision-recall curve moves in recall steps of 1 / (its boxes), and the
    two integrate a step differently by at most that much (precision <= 1); the mAP is the
    mean over classes."""
    counts: dict[int, int] = {}
    for a in truth["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    return round(float(np.mean([1 / n for n in counts.values()])), 4) if counts else 1.0


def disagreement(gap: dict, tolerance: float, explained: float) -> str:
    worst = max(abs(v) for v in gap.values())
    size = "within" if worst <= explained else "beyond"
    return (
        f"Ultralytics and pycocotools disagree by {worst:.4f} (more than "
        f"detect.evaluate.coco_tolerance {tolerance}): {gap}; {size} the {explained:.4f} that "
        "interpolation alone explains on this test set (1 / boxes per class, averaged): "
        + ("a small test set" if size == "within" else "check the predictions file")
    )


def run(params: Params, out_dir: Path = layout.metrics_dir("detect")) -> dict:
    """Ultralytics' validator on the test split, and the same predictions scored again by
    pycocotools; a gap beyond evaluate.coco_tolerance is a warning (disagreement)."""
    p = params.detect.evaluate
    yolo.configure()
    from ultralytics import YOLO

    dataset = read_json(layout.prepared("detect") / "dataset.json")
    names = dataset["names"]
    data, runs = yolo.dataset_view(names), yolo.run_dir("evaluate")
    model = YOLO(layout.model_pt("detect"))
    # save_json: the validator writes its predictions (COCO style, original pixels) for pycocotools.
    m = model.val(
        data=str(data),
        split="test",
        imgsz=model.ckpt["train_args"]["imgsz"],
        batch=16,
        conf=p.conf,
        iou=p.iou,
        device=yolo.device("auto"),
        save_json=True,
        plots=False,
        project=str(runs.parent),
        name=runs.name,
        exist_ok=True,
        verbose=False,
    )
    box = m.box
    ours, per_class = _scores(box, names)
    predictions = (
        json.loads((runs / "predictions.json").read_text())
        if (runs / "predictions.json").exists()
        else []
    )
    prepared = layout.prepared("detect")
    truth = coco_ground_truth(prepared / "images/test", prepared / "labels/test", len(names))
    coco = coco_map(truth, predictions)
    gap = {k: round(ours[k] - coco[k], 4) for k in coco}
    untrained = learned_nothing(
        "detect", "mAP50", ours["mAP50"], p.min_map50, "the floor detect.evaluate.min_map50"
    )
    warnings = list(untrained)
    explained = explained_gap(truth)
    if max(abs(v) for v in gap.values()) > p.coco_tolerance:
        warnings.append(disagreement(gap, p.coco_tolerance, explained))
        log(f"warning: {warnings[-1]}")
    result = {
        "test": {**ours, "per_class": per_class},
        "pycocotools": coco,
        "ultralytics_minus_pycocotools": gap,
        "tolerance": p.coco_tolerance,
        "gap_explained_by_test_set": explained,
        "test_images": dataset["rows"].get("test", 0),
        "warnings": warnings,
    }
    write_json(out_dir / layout.METRICS_FILE, result)
    _write_plots(out_dir / "plots", box, names, per_class)
    log(
        f"test: mAP50={ours['mAP50']:.4f} mAP50-95={ours['mAP50-95']:.4f} (pycocotools: mAP50={coco['mAP50']:.4f} "
        f"mAP50-95={coco['mAP50-95']:.4f})"
    )
    fail_if_untrained(untrained, "detect", params)  # a disagreement never stops a run
    return result
