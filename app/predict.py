"""Serving core: load the exported models and predict, torch-free.

Each task's `predict` hook (stages/<task>/infer.py) is the one `infer` calls, so the app
and `infer` give identical results. Nothing here unpickles: models are ONNX files and
JSON model cards.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.core.common import TASKS, StageError
from stages.core.inference import open_session
from stages.detect import infer as detect
from stages.detect.boxes import load_for_detection, to_records
from stages.image import infer as image
from stages.image.data import load_rgb, top_k
from stages.tabular import infer as tabular
from stages.tabular.data import type_features
HOW_TO_TRAIN = "run `make run` (or `dvc repro infer@{task}`, or `dvc pull` from a remote that has it)"


class BadInput(ValueError):
    """The request's content is wrong: the server answers `status` (4xx) with this message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Loaded:
    card: dict
    session: object


def load_models(models_dir: str | Path = "models") -> tuple[dict[str, Loaded], dict[str, str]]:
    """({task: Loaded} for every exported model, {task: why it is missing} for the rest)."""
    loaded, missing = {}, {}
    for task in TASKS:
        card_path = Path(models_dir) / task / "model.json"
        try:
            card = json.loads(card_path.read_text())
            # Spinning threads would burn the cores between requests of a shared server.
            loaded[task] = Loaded(card, open_session(card_path.parent / card["onnx"]["file"], spinning=False))
        except FileNotFoundError:
            missing[task] = f"no {card_path.parent}/model.onnx + model.json: " + HOW_TO_TRAIN.format(task=task)
        except Exception as e:  # noqa: BLE001 - a broken model must not stop the others from serving
            missing[task] = f"{card_path.parent}: could not load ({type(e).__name__}: {e})"
    return loaded, missing


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an upload, refusing non-images and images over max_pixels before decoding them."""
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - PIL raises several types for "not an image"
        raise BadInput("the upload is not an image PIL can read", 415) from None
    if im.width * im.height > max_pixels:
        raise BadInput(f"the image has {im.width}x{im.height} pixels, more than the limit of {max_pixels}", 413)
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
        raise BadInput(f"the image could not be decoded ({type(e).__name__}: {e})") from None
    return im


def predict_tabular(model: Loaded, rows: list[dict] | pd.DataFrame) -> list[dict]:
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    try:
        table = tabular.predict(model.card, model.session, type_features(df, model.card["features"], "request"),
                                "request")
    except StageError as e:
        raise BadInput(str(e)) from None
    return json.loads(table.to_json(orient="records"))


def predict_image(model: Loaded, data: bytes, k: int, max_pixels: int) -> dict:
    card = model.card
    open_image(data, max_pixels)  # checked first; then the very bytes go through infer's loader
    probs = image.predict(card, model.session, load_rgb(io.BytesIO(data), card["preprocessing"]["image_size"])[None])[0]
    classes = card["classes"]
    order = np.argsort(-probs)[:k]
    return {"prediction": classes[int(order[0])], "probability": float(probs[order[0]]),
            "top_k": [{"class": classes[int(i)], "probability": float(probs[i])} for i in order],
            "top_k_text": top_k(probs[None], classes, k)[0]}


def predict_detect(model: Loaded, data: bytes, conf: float | None, iou: float | None, max_pixels: int) -> list[dict]:
    """conf and iou default to the model card's (what export checked parity at)."""
    card = model.card
    open_image(data, max_pixels)
    conf = card["postprocessing"]["conf"] if conf is None else conf
    iou = card["postprocessing"]["iou"] if iou is None else iou
    loaded = load_for_detection(io.BytesIO(data), card["preprocessing"]["imgsz"])
    return to_records(detect.predict(model.session, [loaded], conf, iou)[0], card["classes"])
