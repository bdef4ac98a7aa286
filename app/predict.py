"""Serving core: load the exported models and predict, torch-free.

Each task's `predict` hook (stages/<task>/infer.py) is the one `infer` calls, so the app
and `infer` give identical results. Nothing here unpickles: models are ONNX files and
JSON model cards.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from app.errors import BadInput
from app.monitor import Monitor
from stages.core.card import Card
from stages.core.cli import StageError
from stages.core.inference import run_all
from stages.core.trust import ood_vectors, with_trust
from stages.detect import infer as detect
from stages.detect.boxes import load_for_detection, to_records
from stages.image import infer as image
from stages.image.data import load_rgb, top_k
from stages.tabular.data import Preprocessor, scores, type_features
from stages.tabular.explain import attributions
from stages.tabular.serving import Rows, json_rows


class Limiter:
    """At most `n` model runs at once in this worker process, whoever asks: the REST routes
    and the Gradio handlers both run the models through predict_* below, which take a slot
    here, so a burst on one side queues beside the other instead of starving it. A request
    that waits longer than `timeout` s gets a 503."""

    def __init__(self, n: int, timeout: float):
        self.slots, self.timeout = threading.BoundedSemaphore(max(1, n)), timeout

    def __enter__(self):
        if not self.slots.acquire(timeout=self.timeout):
            raise BadInput(
                f"the server is busy (no model free within {self.timeout:g} s); try again shortly",
                503,
            )

    def __exit__(self, *exc):
        self.slots.release()


@dataclass
class Loaded:
    card: Card
    session: object
    monitor: Monitor
    limit: Limiter
    rows: Rows | None = None  # the tabular fast path
    batch_size: int = 1  # rows per onnxruntime run (tabular: tabular.infer.batch_size)

    @property
    def version(self) -> str:
        """Which model answers: its registry version when served from the registry, else the
        md5 of the trained model the ONNX file was exported from."""
        if self.card.registry:
            return str(self.card.registry["version"])
        return self.card.provenance["model_md5"]

    def checked(self, rows: list[dict], screened: list[list[str]] | None = None) -> list[list[str]]:
        """Warnings per row; with serve.strict on, any warning refuses the request (422)."""
        warnings = self.monitor.warnings(rows, screened)
        if self.monitor.strict and any(warnings):
            raise BadInput(
                "; ".join(f"row {i + 1}: {w}" for i, ws in enumerate(warnings) for w in ws)
                + " (serve.strict is on)"
            )
        return warnings


class Current:
    """The task's served model at the moment of each use, for the UI's handlers, which are
    built once (a load swaps the model; the features, and so the form, stay the same)."""

    def __init__(self, models: dict[str, Loaded], task: str):
        self._models, self._task = models, task

    def __getattr__(self, name: str):
        return getattr(self._models[self._task], name)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an upload, refusing non-images and images over max_pixels before decoding them."""
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - PIL raises several types for "not an image"
        raise BadInput("the upload is not an image (PNG, JPEG, BMP, GIF or WebP)", 415) from None
    if im.width * im.height > max_pixels:
        raise BadInput(
            f"the image has {im.width}x{im.height} pixels, more than the limit of {max_pixels}", 413
        )
    try:
        im.load()
    except Exception:  # noqa: BLE001 - truncated or corrupt pixel data
        raise BadInput(
            "the image is damaged or cut short: its pixels could not be decoded"
        ) from None
    return im


def predict_tabular(
    model: Loaded, rows: list[dict] | pd.DataFrame, explain: bool = False
) -> list[dict]:
    """Rows → one dict per row: prediction (and probabilities), and `warnings`; with explain,
    `base_value` and `attributions` too (docs/explain.md). JSON rows
    take the numpy fast path (stages/tabular/serving.py); a DataFrame, or a row it cannot
    take as it is (a value the model has not seen), the pandas path that `infer` uses, where
    Preprocessor.screen reads such a cell as missing and says so; both give identical answers."""
    card = model.card
    if isinstance(rows, list):
        rows = json_rows(rows, card)
    x = model.rows.transform(rows) if isinstance(rows, list) and model.rows else None
    screened = None
    try:
        if x is None:
            df = type_features(
                rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows),
                model.card.features,
                "request",
            )
            records = df[[f.name for f in model.card.features]].to_dict("records")
            pre = Preprocessor.from_dict(model.card.preprocessing)
            df, screened = pre.screen(df)
            x = pre.transform(df, "request")
        else:
            records = rows
        warnings = model.checked(records, screened)
        with model.limit:
            # One run up to infer's default batch (as run_all would), without its lookups.
            outs = (
                model.session.run(None, {model.card.onnx.input: x})
                if len(x) <= model.batch_size
                else run_all(model.session, x, model.batch_size)
            )
        preds = (model.rows or Rows(model.card)).decode(outs[0])
        if model.card.trust is not None:  # prediction_set or interval, and ood
            vectors = ood_vectors(model.card, x, outs)
            preds = with_trust(model.card, preds, scores(outs[0], model.card), vectors)
        if explain:
            with model.limit:
                preds = explained(model, x, preds)
    except StageError as e:
        raise BadInput(str(e)) from None
    model.monitor.observe(records)  # the monitor reads the features it knows
    model.monitor.ood(preds)
    return [{**p, "warnings": w} for p, w in zip(preds, warnings, strict=False)]


def explained(model: Loaded, x: np.ndarray, preds: list[dict]) -> list[dict]:
    """Predictions with `base_value` and `attributions` ({column: value}, summing with the
    base value to the answer's probability, or its prediction; stages/tabular/explain.py)."""
    card = model.card
    if card.explain is None:
        raise BadInput(
            "the served tabular model has no explanation background in its card (exported "
            "before explanations existed): re-run `dvc repro export@tabular`"
        )
    classes = card.classes
    predicted = (
        np.array([classes.index(pred["prediction"]) for pred in preds])
        if card.kind == "classification"
        else None
    )
    base, phi = attributions(card, model.session, x, predicted)
    names = card.explain["columns"]
    return [
        {**p, "base_value": float(b), "attributions": dict(zip(names, a.tolist(), strict=True))}
        for p, b, a in zip(preds, base, phi, strict=True)
    ]


def predict_image(
    model: Loaded, data: bytes, k: int, max_pixels: int, explain: bool = False
) -> dict:
    """One image → its classes (and trust, warnings); with explain, `heatmap_png` too: the
    predicted class's activation map as a base64 grayscale PNG of the image's size."""
    card = model.card
    if explain and image.no_cam(card):
        raise BadInput(f"no heatmap for this image model: {image.no_cam(card)}")
    im = open_image(
        data, max_pixels
    )  # checked first; then the very bytes go through infer's loader
    rgb = load_rgb(io.BytesIO(data), card.preprocessing["image_size"])
    seen = {
        "width": im.width,
        "height": im.height,
        "mode": im.mode,
        "brightness": float(rgb.mean() / 255),
    }
    warnings = model.checked([seen])[0]
    with model.limit:
        probs, feats, cams = image.predict_with_cams(card, model.session, rgb[None])
    model.monitor.observe([seen])
    classes = card.classes
    trusted = with_trust(card, [{}], probs, feats)[0]  # prediction_set and ood
    model.monitor.ood([trusted])
    probs = probs[0]
    order = np.argsort(-probs)[:k]
    return {
        **trusted,
        "prediction": classes[int(order[0])],
        "probability": float(probs[order[0]]),
        "top_k": [{"class": classes[int(i)], "probability": float(probs[i])} for i in order],
        "top_k_text": top_k(probs[None], classes, k)[0],
        "warnings": warnings,
        **(
            {"heatmap_png": png_base64(image.heatmap(cams[0], im.width, im.height))}
            if explain
            else {}
        ),
    }


def png_base64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def predict_detect(
    model: Loaded, data: bytes, conf: float | None, iou: float | None, max_pixels: int
) -> dict:
    """{detections, count, warnings}; conf and iou default to the model card's (what export
    checked parity at)."""
    card = model.card
    im = open_image(data, max_pixels)
    seen = {"width": im.width, "height": im.height, "mode": im.mode}
    warnings = model.checked([seen])[0]
    card_conf, card_iou = detect.thresholds(card)  # the ones batch infer uses
    conf = card_conf if conf is None else conf
    iou = card_iou if iou is None else iou
    loaded = load_for_detection(io.BytesIO(data), card.preprocessing["imgsz"])
    with model.limit:
        found = to_records(detect.predict(model.session, [loaded], conf, iou)[0], card.classes)
    area = im.width * im.height
    model.monitor.observe(
        [
            {
                **seen,
                "boxes": len(found),
                "score": [d["score"] for d in found],
                "box_size": [float(np.sqrt(d["bbox"][2] * d["bbox"][3] / area)) for d in found],
            }
        ]
    )
    return {"detections": found, "count": len(found), "warnings": warnings}
