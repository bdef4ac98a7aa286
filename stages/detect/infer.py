"""infer: batch detection with onnxruntime, and the serving hook the app calls. Imports no torch.

    python -m stages infer detect   # a folder or manifest → data/predictions/detect.json (COCO-style results)

Also writes metrics/detect/infer.json with its throughput and the files it could not read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stages.core import layout
from stages.core.card import Card, read_card
from stages.core.cli import log
from stages.core.files import atomic_dir, atomic_path, write_json, write_timing
from stages.core.images import list_images
from stages.core.inference import open_session
from stages.core.schema import Params
from stages.detect.boxes import decode, draw_boxes, load_for_detection, to_records


def graph_type(session) -> str:
    """What the exported graph's output is: "raw" (the head, decoded and NMS'd here), "nms"
    (Ultralytics' nms=True: NMS inside) or "end2end" (an NMS-free head). From Ultralytics'
    ONNX metadata; without it, from the output shape: final rows are (batch, N, 6)."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("end2end") == "True":
        return "end2end"
    if "'nms': True" in meta.get("args", ""):
        return "nms"
    if "args" in meta:
        return "raw"
    return "end2end" if session.get_outputs()[0].shape[-1] == 6 else "raw"


def thresholds(card: Card) -> tuple[float, float]:
    """(conf, iou): the model card's, which export checked parity at (detect.export.conf, iou).
    Batch infer and serving both take them from here, so they detect the same boxes."""
    post = card.postprocessing
    return post["conf"], post["iou"]


def predict(
    session, images: list[tuple[np.ndarray, dict]], conf: float, iou: float
) -> list[np.ndarray]:
    """Letterboxed images with their meta (load_for_detection) → per image, N × 6 [x1, y1, x2,
    y2, score, class] in original pixels. `infer`, the app and the export parity check call this;
    any of the three graph types (graph_type) is served."""
    if not images:
        return []
    graph = graph_type(session)
    name = session.get_inputs()[0].name
    x = np.stack([x for x, _ in images])
    if graph == "nms":
        # Ultralytics' NMS graph loops over the batch size it was traced with (1): one image a run.
        outputs = np.concatenate(
            [session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))]
        )
    else:
        outputs = session.run(None, {name: x})[0]
    return [
        decode(out, meta, conf, iou, graph=graph)
        for out, (_, meta) in zip(outputs, images, strict=False)
    ]


def run(
    params: Params,
    model_dir: Path = layout.model_dir("detect"),
    out: Path = layout.PREDICTIONS["detect"],
    rendered: Path = layout.RENDERED,
) -> dict:
    """COCO-style results ({file, category_id, category, bbox [x, y, w, h] in pixels, score})
    for every image; unreadable files are listed in metrics/detect/infer.json and skipped."""
    p = params.detect.infer
    card = read_card(model_dir / layout.card("detect").name)
    names, size = card.classes, card.preprocessing["imgsz"]
    table, root = list_images(p.source, labelled=False)
    files = table["path"].tolist()
    session = open_session(model_dir / card.onnx.file)
    conf, iou = thresholds(card)
    results, errors, shown = [], [], []
    start = time.perf_counter()
    for i in range(0, len(files), p.batch_size):
        batch, names_ok = [], []
        for f in files[i : i + p.batch_size]:
            try:
                x, meta = load_for_detection(root / f, size)
            except Exception as e:  # noqa: BLE001 - unreadable file: report it, keep going
                errors.append({"file": f, "error": f"{type(e).__name__}: {e}"})
                continue
            batch.append((x, meta))
            names_ok.append(f)
        for f, dets in zip(names_ok, predict(session, batch, conf, iou), strict=False):
            if len(shown) < p.render:
                shown.append((f, dets))
            results += [{"file": f, **r} for r in to_records(dets, names)]
    seconds = time.perf_counter() - start
    with atomic_path(out) as tmp:
        tmp.write_text(
            "[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]\n"
        )  # one detection a line
    with atomic_dir(rendered) as tmp:
        for f, dets in shown:
            draw_boxes(root / f, dets, names).save(
                tmp / (f.replace("/", "__").rsplit(".", 1)[0] + ".png")
            )
    n = len(files) - len(errors)
    stats = {"images": n, "failed": len(errors), "detections": len(results), "errors": errors}
    timing = {"seconds": round(seconds, 4), "images_per_s": round(n / max(seconds, 1e-9), 1)}
    write_json(layout.infer_stats("detect"), stats)
    write_timing("infer-detect", timing)
    log(
        f"detected {len(results)} objects in {n} images from {p.source} → {out} ({timing['images_per_s']} images/s)"
        + (
            f"; {len(errors)} could not be read (see {layout.infer_stats('detect')})"
            if errors
            else ""
        )
    )
    return {**stats, **timing}
