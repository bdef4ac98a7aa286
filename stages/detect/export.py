"""export: Ultralytics' ONNX exporter, then the input fixed to imgsz × imgsz with a dynamic
batch; parity: our numpy pipeline (letterbox, decode, NMS) vs Ultralytics' predict.

    python -m stages export detect
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from stages.core import layout
from stages.core.card import Card, card_common, reference, validated_ranges, write_card
from stages.core.cli import StageError, log
from stages.core.documents import Meta
from stages.core.files import atomic_path, read_json
from stages.core.inference import open_session
from stages.core.schema import DetectExport, Graph, Params
from stages.detect import yolo
from stages.detect.boxes import box_iou, load_for_detection
from stages.detect.infer import graph_type, predict

GRAPHS: dict[Graph, bool | None] = {
    "raw": None,
    "nms": True,
    "end2end": False,
}  # detect.export.graph → Ultralytics' export(nms=...)
OUTPUTS = {
    "raw": "(batch, 4 + classes, anchors): cx, cy, w, h in input pixels, then class scores",
    "nms": "(batch, max_det, 6): x1, y1, x2, y2 in input pixels, score, class; zero rows pad",
    "end2end": "(batch, max_det, 6): x1, y1, x2, y2 in input pixels, score, class (top-k, no NMS needed)",
}


def detections_onnx(
    session, files: list[Path], size: int, conf: float, iou: float
) -> list[np.ndarray]:
    """Our torch-free path: letterbox, onnxruntime, decode + NMS (the same code as infer)."""
    return [predict(session, [load_for_detection(f, size)], conf, iou)[0] for f in files]


def match_share(reference: list[np.ndarray], candidate: list[np.ndarray], min_iou: float) -> float:
    """Share of reference boxes with a same-class candidate box at IoU >= min_iou (one-to-one)."""
    total = matched = 0
    for ref, cand in zip(reference, candidate, strict=False):
        total += len(ref)
        used = np.zeros(len(cand), bool)
        ious = (
            box_iou(ref[:, :4], cand[:, :4]) if len(ref) and len(cand) else np.zeros((len(ref), 0))
        )
        for i in np.argsort(-ref[:, 4]):
            ok = (
                (~used) & (cand[:, 5] == ref[i, 5]) & (ious[i] >= min_iou)
                if len(cand)
                else np.zeros(0, bool)
            )
            if ok.any():
                used[np.flatnonzero(ok)[np.argmax(ious[i][ok])]] = True
                matched += 1
    return matched / total if total else 1.0


def detect_reference(files: list[Path], found: list[np.ndarray]) -> dict:
    """Training images (width, height, mode) and what the exported model finds on the val
    images at the card's conf: scores, box sizes (sqrt(box area / image area)) and boxes per
    image, so served detections can be compared with the same kind of numbers."""
    import pandas as pd
    from PIL import Image

    images = pd.read_parquet(layout.prepared("detect") / "images.parquet")
    train = images[images["split"] == "train"]
    modes, scores, sizes = [], [], []
    for f in train["file"]:
        with Image.open(f) as im:
            modes.append(im.mode)
    for f, dets in zip(files, found, strict=False):
        with Image.open(f) as im:
            area = im.width * im.height
        scores += dets[:, 4].tolist()
        sizes += np.sqrt((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1]) / area).tolist()
    return reference(
        {
            "width": train["width"],
            "height": train["height"],
            "mode": pd.Series(modes, dtype=object),
            "boxes": pd.Series([len(d) for d in found], dtype="float64"),
            "score": pd.Series(scores, dtype="float64"),
            "box_size": pd.Series(sizes, dtype="float64"),
        },
        validated_ranges("detect"),
        f"{layout.prepared('detect')} (training images; detections on val images)",
    )


def export_onnx(pt: Path, onnx_path: Path, wanted: str, conf: float, iou: float) -> None:
    """Ultralytics' ONNX exporter (dynamic axes), then the input fixed to imgsz × imgsz with
    a dynamic batch, written to onnx_path."""
    import onnx
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(dir=yolo.CACHE) as tmp:
        shutil.copy2(pt, Path(tmp) / layout.MODEL_PT_FILE)
        if wanted not in GRAPHS:
            raise StageError(
                f"detect.export.graph is {wanted!r}; choose one of: {', '.join(GRAPHS)}"
            )
        model = YOLO(Path(tmp) / layout.MODEL_PT_FILE)
        size = int(model.ckpt["train_args"]["imgsz"])
        # nms: None keeps the raw head; True puts NMS in the graph (conf, iou as below); False
        # exports an NMS-free head end to end (YOLO26, YOLOv10; others stay raw).
        # Quiet: Ultralytics' report names the temporary copy (gone in a moment) and offers
        # `yolo predict` commands on it; the stage's own line names models/detect/model.onnx.
        with yolo.warnings_only():
            exported = model.export(
                format="onnx",
                imgsz=size,
                dynamic=True,
                simplify=False,
                device="cpu",
                verbose=False,
                nms=GRAPHS[wanted],
                conf=conf,
                iou=iou,
            )
        graph = onnx.load(exported)
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = size  # fixed imgsz; the batch stays symbolic
        # Ultralytics stamps the export time into the metadata: the same model would get new
        # bytes on every export (dvc.lock churn); the rest of its metadata stays.
        kept = [m for m in graph.metadata_props if m.key != "date"]
        del graph.metadata_props[:]
        graph.metadata_props.extend(kept)
        with atomic_path(onnx_path) as out:
            onnx.save(graph, str(out))


def parity_check(
    model, session, files: list[Path], size: int, p: DetectExport
) -> tuple[dict, list]:
    """Our numpy pipeline vs Ultralytics' predict on files: (the parity record, our boxes)."""
    theirs = [
        np.concatenate(
            [r.boxes.xyxy.numpy(), r.boxes.conf.numpy()[:, None], r.boxes.cls.numpy()[:, None]], 1
        )
        for r in model.predict(
            [str(f) for f in files],
            imgsz=size,
            conf=p.conf,
            iou=p.iou,
            device="cpu",
            verbose=False,
            stream=True,
        )
    ]
    ours = detections_onnx(session, files, size, p.conf, p.iou)
    parity = {
        "images": len(files),
        "boxes_ultralytics": int(sum(len(t) for t in theirs)),
        "boxes_onnx": int(sum(len(o) for o in ours)),
        "matched_of_ultralytics": match_share(theirs, ours, p.match_iou),
        "matched_of_onnx": match_share(ours, theirs, p.match_iou),
        "match_iou": p.match_iou,
    }
    return parity, ours


def postprocessing(graph: str, p: DetectExport) -> dict:
    """The card's postprocessing: what infer and serving do after the graph, at which
    thresholds (stages/detect/infer.py thresholds)."""
    return {
        "graph": graph,
        "output": OUTPUTS[graph],
        "nms": "per class, greedy"
        + (
            " (inside the graph, at the conf and iou below)"
            if graph == "nms"
            else " (none: an NMS-free head)"
            if graph == "end2end"
            else ""
        ),
        "conf": p.conf,
        "iou": p.iou,
        "max_det": 300,
    }


def run(params: Params, out_dir: Path = layout.model_dir("detect")) -> Card:
    """Ultralytics' ONNX exporter (dynamic axes), then the input fixed to imgsz × imgsz with
    a dynamic batch; parity: our numpy pipeline vs Ultralytics' predict on the val images."""
    p = params.detect.export
    yolo.configure()
    from ultralytics import YOLO

    model = YOLO(out_dir / layout.MODEL_PT_FILE)
    size = int(model.ckpt["train_args"]["imgsz"])
    onnx_path = out_dir / layout.MODEL_ONNX_FILE
    export_onnx(out_dir / layout.MODEL_PT_FILE, onnx_path, p.graph, p.conf, p.iou)
    session = open_session(onnx_path)
    graph = graph_type(session)
    if graph != p.graph:
        raise StageError(
            f"detect.export.graph is {p.graph!r} but Ultralytics exported a {graph!r} graph for "
            f"{model.ckpt['train_args']['model']}: NMS inside needs a head with NMS (YOLOv8/11), "
            "end2end an NMS-free head (YOLO26, YOLOv10)"
        )
    files = sorted(f for f in (layout.prepared("detect") / "images/val").iterdir() if f.is_file())
    parity, ours = parity_check(model, session, files, size, p)
    if min(parity["matched_of_ultralytics"], parity["matched_of_onnx"]) < p.min_matched:
        raise StageError(
            f"{onnx_path}: onnxruntime + numpy decoding matches Ultralytics on too few boxes: {parity}"
        )
    names = read_json(layout.prepared("detect") / "dataset.json")["names"]
    args = model.ckpt["train_args"]
    meta = Meta(
        train={
            k: args.get(k) for k in ("model", "epochs", "imgsz", "batch", "lr0", "patience", "seed")
        },
        schema=read_json(layout.prepared("detect") / "dataset.json"),
        params={"seed": args.get("seed")},
    )
    card = {
        **card_common("detect", "detection", onnx_path, ["batch", 3, size, size], meta, parity, p),
        "classes": names,
        "preprocessing": {
            "imgsz": size,
            "letterbox": "keep aspect ratio, bilinear (as cv2.INTER_LINEAR), centre, pad with 114",
            "mode": "RGB",
            "scale": "x / 255",
            "layout": "NCHW float32",
        },
        "postprocessing": postprocessing(graph, p),
        "reference": detect_reference(files, ours),
    }
    card = write_card(out_dir / layout.card("detect").name, card)
    log(
        f"exported {onnx_path} (parity on {len(files)} val images: {parity['matched_of_ultralytics']:.3f} of "
        f"Ultralytics' boxes matched at IoU >= {p.match_iou})"
    )
    return card
