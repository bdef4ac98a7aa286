"""evaluate: score the trained model on the test split, beside a scikit-learn baseline.

    python -m stages.evaluate tabular

Outputs: metrics/<task>/metrics.json and plot data in metrics/<task>/plots/
(confusion matrix, micro-averaged ROC and PR curves; predicted vs actual for regression).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.common import StageError, log, read_json, run_stage, write_json
from stages.image import contact_sheet, preprocess
from stages.models import build_model
from stages.tabular import Preprocessor, softmax
from stages.trainer import load_checkpoint


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    ck = load_checkpoint(Path(path))
    model = build_model(ck["meta"]["arch"])
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck["meta"]


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).float().numpy()
                           for i in range(0, max(len(x), 1), batch_size)])


def split_images(schema: dict, split: str = "test") -> tuple[list[Path], np.ndarray]:
    """A split's files and their class indices."""
    index = pd.read_parquet("data/prepared/image/index.parquet")
    rows = index[index["split"] == split]
    labels = pd.Categorical(rows["label"], categories=schema["classes"]).codes
    return [Path(schema["root"]) / p for p in rows.index], np.asarray(labels)


def classification_report(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> tuple[dict, dict]:
    """Metrics and plot rows. ROC/PR are micro-averaged (one curve for any number of classes)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, roc_auc_score, roc_curve

    pred = probs.argmax(1)
    onehot = np.eye(len(classes))[y]
    if len(classes) == 2:
        auc = roc_auc_score(y, probs[:, 1])
        scores, truth = probs[:, 1], y
    else:
        auc = roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(len(classes))))
        scores, truth = probs.ravel(), onehot.ravel()
    fpr, tpr, _ = roc_curve(truth, scores)
    precision, recall, _ = precision_recall_curve(truth, scores)
    metrics = {"accuracy": accuracy_score(y, pred), "f1_macro": f1_score(y, pred, average="macro"), "roc_auc": auc}
    plots = {
        "confusion": [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(y, pred)],
        "roc": [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr)],
        "pr": [{"recall": float(r), "precision": float(p)} for r, p in zip(recall, precision)],
    }
    return {k: float(v) for k, v in metrics.items()}, plots


def regression_report(y: np.ndarray, pred: np.ndarray) -> tuple[dict, dict]:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    metrics = {"rmse": float(np.sqrt(mean_squared_error(y, pred))), "mae": float(mean_absolute_error(y, pred)),
               "r2": float(r2_score(y, pred))}
    return metrics, {"predicted": [{"actual": float(a), "predicted": float(p)} for a, p in zip(y, pred)]}


def evaluate_tabular(params: dict, out_dir: Path = Path("metrics/tabular")) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    model, meta = load_model("models/tabular/model.pt")
    schema, pre = meta["schema"], Preprocessor.from_dict(meta["preprocessor"])
    prepared = Path("data/prepared/tabular")
    train_df, test_df = (pd.read_parquet(prepared / f"{s}.parquet") for s in ("train", "test"))
    x_train, x_test = pre.transform(train_df), pre.transform(test_df)
    target, classify = schema["target"], schema["task"] == "classification"
    out = predict(model, x_test)
    if classify:
        classes = schema["classes"]
        y_train, y_test = (pd.Categorical(d[target], categories=classes).codes for d in (train_df, test_df))
        metrics, plots = classification_report(y_test, softmax(out.astype("float64")), classes)
    else:
        scale = meta["target_scaling"]
        y_train, y_test = train_df[target].to_numpy("float64"), test_df[target].to_numpy("float64")
        metrics, plots = regression_report(y_test, out[:, 0] * scale["std"] + scale["mean"])
    base_metrics = {}
    if params["tabular"]["evaluate"]["baseline"]:
        # The baseline sees the same split and the same preprocessed features as the MLP.
        if classify:
            hgb = HistGradientBoostingClassifier(random_state=params["seed"]).fit(x_train, y_train)
            base_metrics = classification_report(y_test, hgb.predict_proba(x_test), classes)[0]
        else:
            hgb = HistGradientBoostingRegressor(random_state=params["seed"]).fit(x_train, y_train)
            base_metrics = regression_report(y_test, hgb.predict(x_test))[0]
    result = {"test": metrics, "baseline_hgb": base_metrics, "test_rows": len(test_df)}
    write_json(out_dir / "metrics.json", result)
    for name, rows in plots.items():
        write_json(out_dir / "plots" / f"{name}.json", rows)
    log("test: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        + (" | HistGradientBoosting: " + " ".join(f"{k}={v:.4f}" for k, v in base_metrics.items())
           if base_metrics else ""))
    return result


def evaluate_image(params: dict, out_dir: Path = Path("metrics/image")) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    model, meta = load_model("models/image/model.pt")
    schema, classes = meta["schema"], meta["schema"]["classes"]
    paths, y = split_images(schema)
    probs = softmax(predict(model, preprocess(paths, schema)).astype("float64"))
    metrics, plots = classification_report(y, probs, classes)
    precision, recall, _, support = precision_recall_fscore_support(y, probs.argmax(1), labels=range(len(classes)),
                                                                    zero_division=0)
    metrics["per_class"] = {c: {"precision": float(p), "recall": float(r), "support": int(n)}
                            for c, p, r, n in zip(classes, precision, recall, support)}
    result = {"test": metrics, "test_images": len(paths)}
    write_json(out_dir / "metrics.json", result)
    for name, rows in plots.items():
        write_json(out_dir / "plots" / f"{name}.json", rows)
    # The worst mistakes: wrong predictions made with the most confidence.
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:params["image"]["evaluate"]["worst"]]
    contact_sheet([(paths[i], f"{classes[y[i]]}->{classes[pred[i]]} {probs[i, pred[i]]:.2f}") for i in wrong],
                  out_dir / "plots" / "mistakes.png")
    log(f"test: accuracy={metrics['accuracy']:.4f} f1_macro={metrics['f1_macro']:.4f} on {len(paths)} images, "
        f"{len(np.flatnonzero(pred != y))} mistakes → {out_dir}/plots/mistakes.png")
    return result


def coco_ground_truth(images_dir: Path, labels_dir: Path, n_classes: int) -> dict:
    """The YOLO labels of a split as a COCO ground-truth dict (ids 1..N in file order)."""
    from PIL import Image

    from stages.detect import parse_yolo_label, upright_size

    images, anns = [], []
    for i, f in enumerate(sorted(p for p in images_dir.iterdir() if p.is_file()), start=1):
        with Image.open(f) as im:
            w, h = upright_size(im)  # Ultralytics (OpenCV) labels and predicts the EXIF-rotated image
        images.append({"id": i, "file_name": f.name, "width": w, "height": h})
        label = labels_dir / f"{f.stem}.txt"
        for row in parse_yolo_label(label) if label.exists() else []:
            bw, bh = row["w"] * w, row["h"] * h
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(row["cls"]) + 1, "iscrowd": 0,
                         "bbox": [row["x"] * w - bw / 2, row["y"] * h - bh / 2, bw, bh], "area": bw * bh})
    return {"images": images, "annotations": anns, "categories": [{"id": c + 1} for c in range(n_classes)]}


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


def evaluate_detect(params: dict, out_dir: Path = Path("metrics/detect")) -> dict:
    """Ultralytics' validator on the test split, and the same predictions scored again by
    pycocotools. The two mAPs must agree within evaluate.coco_tolerance."""
    from stages import yolo

    p = params["detect"]["evaluate"]
    yolo.configure()
    from ultralytics import YOLO

    dataset = read_json("data/prepared/detect/dataset.json")
    names = dataset["names"]
    data, runs = yolo.dataset_view(names), yolo.run_dir("evaluate")
    model = YOLO("models/detect/model.pt")
    # save_json: the validator writes its predictions (COCO style, original pixels) for pycocotools.
    m = model.val(data=str(data), split="test", imgsz=model.ckpt["train_args"]["imgsz"], batch=16, conf=p["conf"],
                  iou=p["iou"], device=yolo.device("auto"), save_json=True, plots=False, project=str(runs.parent),
                  name=runs.name, exist_ok=True, verbose=False)
    box = m.box
    per_class = {names[int(c)]: {"ap50": float(box.ap50[i]), "ap50_95": float(box.ap[i])}
                 for i, c in enumerate(box.ap_class_index)}
    ours = {"mAP50": float(box.map50), "mAP50-95": float(box.map), "precision": float(box.mp), "recall": float(box.mr)}
    predictions = json.loads((runs / "predictions.json").read_text()) if (runs / "predictions.json").exists() else []
    prepared = Path("data/prepared/detect")
    coco = coco_map(coco_ground_truth(prepared / "images/test", prepared / "labels/test", len(names)), predictions)
    gap = {k: round(ours[k] - coco[k], 4) for k in coco}
    result = {"test": {**ours, "per_class": per_class}, "pycocotools": coco, "ultralytics_minus_pycocotools": gap,
              "tolerance": p["coco_tolerance"], "test_images": dataset["rows"].get("test", 0)}
    write_json(out_dir / "metrics.json", result)
    px, curves = box.curves_results[0][0], np.asarray(box.curves_results[0][1])
    step = max(1, len(px) // 100)
    write_json(out_dir / "plots" / "pr.json",
               [{"recall": float(px[j]), "precision": float(curves[:, j].mean()) if curves.size else 0.0,
                 **{names[int(c)]: float(curves[i, j]) for i, c in enumerate(box.ap_class_index)}}
                for j in range(0, len(px), step)])
    write_json(out_dir / "plots" / "per_class_ap.json",
               [{"class": n, "ap50": v["ap50"], "ap50_95": v["ap50_95"]} for n, v in per_class.items()])
    log(f"test: mAP50={ours['mAP50']:.4f} mAP50-95={ours['mAP50-95']:.4f} (pycocotools: mAP50={coco['mAP50']:.4f} "
        f"mAP50-95={coco['mAP50-95']:.4f})")
    if max(abs(v) for v in gap.values()) > p["coco_tolerance"]:
        raise StageError(f"Ultralytics and pycocotools disagree by more than {p['coco_tolerance']}: {gap} "
                         f"(see {out_dir}/metrics.json)")
    return result


if __name__ == "__main__":
    run_stage({"tabular": evaluate_tabular, "image": evaluate_image, "detect": evaluate_detect})
