"""The Gradio app: a tab per task and a tab of model cards. Handlers are plain functions
(tested directly and through gradio_client); nothing is loaded at import."""
from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from app.predict import BadInput, Loaded, predict_detect, predict_image, predict_tabular
from stages.core.common import StageError
from stages.core.images import image_extensions
from stages.detect.boxes import draw_boxes
from stages.tabular.data import read_csv

HEADLINE = ("accuracy", "f1_macro", "roc_auc", "rmse", "mae", "r2", "mAP50", "mAP50-95")
MAX_ZIP_IMAGES = 1000


def _error(e: Exception):
    import gradio as gr

    return gr.Error(str(e))


def tabular_form(model: Loaded, *values) -> dict | float:
    """One row from the form → {class: probability} (gr.Label) or the predicted value."""
    row = dict(zip([f["name"] for f in model.card["features"]], values))
    try:
        pred = predict_tabular(model, [row])[0]
    except BadInput as e:
        raise _error(e) from None
    if model.card["kind"] == "classification":
        return {c: pred[f"p_{c}"] for c in model.card["classes"]}
    return pred["prediction"]


def tabular_csv(model: Loaded, path: str, max_rows: int) -> str:
    """An uploaded CSV → a CSV of predictions (line, prediction, probabilities), as a file."""
    try:
        df = read_csv(path)
        if len(df) > max_rows:
            raise BadInput(f"{len(df)} rows, more than the limit of {max_rows}")
        preds = pd.DataFrame(predict_tabular(model, df))
    except (BadInput, StageError) as e:
        raise _error(e) from None
    preds.insert(0, "line", df.index.to_numpy())
    out = Path(tempfile.mkdtemp()) / f"{Path(path).stem}-predictions.csv"
    preds.to_csv(out, index=False)
    return str(out)


def image_one(model: Loaded, path: str, k: int, max_pixels: int) -> dict:
    try:
        result = predict_image(model, Path(path).read_bytes(), k, max_pixels)
    except BadInput as e:
        raise _error(e) from None
    return {r["class"]: r["probability"] for r in result["top_k"]}


def image_zip(model: Loaded, path: str, k: int, max_pixels: int) -> str:
    """A zip of images → CSV (name, prediction, probability, top_k, error). Entries are read
    in memory, never extracted, so no name in the archive can write anywhere."""
    exts, rows = image_extensions(), []
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _error(BadInput("the upload is not a zip file")) from None
    with archive:
        names = [n for n in archive.namelist() if Path(n).suffix.lower() in exts and not n.endswith("/")]
        if len(names) > MAX_ZIP_IMAGES:
            raise _error(BadInput(f"{len(names)} images, more than the limit of {MAX_ZIP_IMAGES}"))
        for name in names:
            try:
                r = predict_image(model, archive.read(name), k, max_pixels)
                rows.append({"name": name, "prediction": r["prediction"], "probability": r["probability"],
                             "top_k": r["top_k_text"], "error": None})
            except BadInput as e:
                rows.append({"name": name, "prediction": None, "probability": None, "top_k": None, "error": str(e)})
    out = Path(tempfile.mkdtemp()) / "predictions.csv"
    pd.DataFrame(rows, columns=["name", "prediction", "probability", "top_k", "error"]).to_csv(out, index=False)
    return str(out)


def detect_one(model: Loaded, path: str, conf: float, iou: float, max_pixels: int):
    """An image → (the image with boxes drawn, a table of detections)."""
    try:
        found = predict_detect(model, Path(path).read_bytes(), conf, iou, max_pixels)
    except BadInput as e:
        raise _error(e) from None
    dets = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3],
                      d["score"], d["category_id"]] for d in found]).reshape(-1, 6)
    table = pd.DataFrame([{"category": d["category"], "score": d["score"], "x": d["bbox"][0], "y": d["bbox"][1],
                           "width": d["bbox"][2], "height": d["bbox"][3]} for d in found],
                         columns=["category", "score", "x", "y", "width", "height"])
    return draw_boxes(path, dets, model.card["classes"]), table


def cards_markdown(models: dict[str, Loaded], missing: dict[str, str]) -> str:
    parts = []
    for task, m in models.items():
        c = m.card
        test = c.get("metrics", {}).get("test", {})
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k in HEADLINE)
        parts.append(f"### {task} ({c['kind']})\n\n- **test metrics**: {metrics}\n"
                     f"- **validation**: {'passed' if c['validation']['success'] else 'FAILED'} "
                     f"(`{c['validation']['suite_file']}`)\n- **model md5**: `{c.get('provenance', {}).get('model_md5', '?')}`\n"
                     f"- **data**: `{c['data']['source']}` ({c['data']['rows']})\n"
                     f"- **parity (ONNX vs training framework)**: `{json.dumps(c['parity'])}`\n"
                     f"- **params**: `{json.dumps(c['params'])[:600]}`\n")
    parts += [f"### {task}\n\nNot loaded: {why}\n" for task, why in missing.items()]
    return "\n".join(parts)


def build_ui(models: dict[str, Loaded], missing: dict[str, str], cfg: dict):
    import gradio as gr

    k, max_pixels = cfg["top_k"], cfg["max_pixels"]
    with gr.Blocks(title="model-train", analytics_enabled=False) as demo:
        gr.Markdown("# model-train\nPredictions from the exported ONNX models. REST API: [/docs](/docs).")
        with gr.Tab("Tabular"):
            m = models.get("tabular")
            if m is None:
                gr.Markdown(f"**No tabular model.** {missing['tabular']}")
            else:
                inputs = []
                with gr.Row():
                    for f in m.card["features"]:
                        if f["type"] == "numeric":
                            inputs.append(gr.Number(label=f["name"], elem_id=f"tab-{f['name']}"))
                        else:
                            inputs.append(gr.Dropdown(f["categories"], label=f["name"], elem_id=f"tab-{f['name']}"))
                go = gr.Button("Predict", variant="primary", elem_id="tab-predict")
                out = gr.Label(label="prediction", elem_id="tab-out") if m.card["kind"] == "classification" \
                    else gr.Number(label=f"predicted {m.card['target']}", elem_id="tab-out")
                go.click(lambda *v, m=m: tabular_form(m, *v), inputs, out, api_name="tabular_form")
                gr.Markdown("Or upload a CSV with the feature columns:")
                csv_in, csv_out = gr.File(file_types=[".csv"], label="CSV"), gr.File(label="predictions")
                csv_in.upload(lambda p, m=m: tabular_csv(m, p, cfg["max_rows"]), csv_in, csv_out, api_name="tabular_csv")
        with gr.Tab("Image"):
            m = models.get("image")
            if m is None:
                gr.Markdown(f"**No image model.** {missing['image']}")
            else:
                img = gr.Image(type="filepath", label="image", elem_id="img-in")
                label = gr.Label(num_top_classes=k, label="top classes", elem_id="img-out")
                img.upload(lambda p, m=m: image_one(m, p, k, max_pixels), img, label, api_name="image_one")
                gr.Markdown("Or a zip of images:")
                zip_in, zip_out = gr.File(file_types=[".zip"], label="zip"), gr.File(label="predictions")
                zip_in.upload(lambda p, m=m: image_zip(m, p, k, max_pixels), zip_in, zip_out, api_name="image_zip")
        with gr.Tab("Detection"):
            m = models.get("detect")
            if m is None:
                gr.Markdown(f"**No detection model.** {missing['detect']}")
            else:
                with gr.Row():
                    det_in = gr.Image(type="filepath", label="image", elem_id="det-in")
                    det_img = gr.Image(type="pil", label="detections", elem_id="det-img")
                post = m.card["postprocessing"]  # the thresholds export checked parity at
                conf = gr.Slider(0, 1, value=post["conf"], step=0.01, label="confidence")
                iou = gr.Slider(0, 1, value=post["iou"], step=0.01, label="NMS IoU")
                table = gr.Dataframe(label="objects", elem_id="det-table")
                run = gr.Button("Detect", variant="primary", elem_id="det-run")
                for trigger in (det_in.upload, run.click):
                    trigger(lambda p, c, i, m=m: detect_one(m, p, c, i, max_pixels), [det_in, conf, iou],
                            [det_img, table], api_name="detect_one" if trigger == run.click else False)
        with gr.Tab("Models"):
            gr.Markdown(cards_markdown(models, missing))
    return demo
