"""export: the image model → models/image/model.onnx (dynamic batch) + model.json, failing
when onnxruntime and torch disagree on the test images.

    python -m stages export image
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from stages.core import layout
from stages.core.card import Card, card_common, reference, validated_ranges, write_card
from stages.core.cli import log
from stages.core.onnx_export import (
    FirstOutput,
    WithFeatures,
    check_parity,
    export_onnx,
    load_model,
)
from stages.core.schema import Params
from stages.image.cam import WithCam, cam_layers
from stages.image.data import load_rgb, preprocess, split_images
from stages.image.model import build_model
from stages.image.trust import fit_trust


def image_reference(schema: dict, size: int, sample: int = 2000) -> dict:
    """Per training image: width, height, mode (from the prepared index) and brightness, the
    mean of the model's RGB input / 255 (on the first `sample` images: a bounded cost)."""
    index = pd.read_parquet(layout.prepared("image") / "index.parquet")
    train = index[index["split"] == "train"]
    paths, _ = split_images(schema, "train")
    brightness = [float(load_rgb(p, size).mean() / 255) for p in paths[:sample]]
    return reference(
        {
            "width": train["width"],
            "height": train["height"],
            "mode": train["mode"],
            "brightness": pd.Series(brightness, dtype="float64"),
        },
        validated_ranges("image"),
        f"{layout.prepared('image') / 'index.parquet'} (the training split)",
    )


def run(params: Params, out_dir: Path = layout.model_dir("image")) -> Card:
    p = params.image.export
    model, meta = load_model(out_dir / layout.MODEL_PT_FILE, build_model)
    schema = meta.prepared  # image prepare's description (ImageIndex), as preprocess reads it
    paths, _ = split_images(schema)
    x_test = preprocess(paths, schema)
    onnx_path = out_dir / layout.MODEL_ONNX_FILE
    # The graph: (logits / temperature, penultimate features, and where it can the class
    # activation map of the predicted class): calibrated, with what OOD reads, and why.
    trust = fit_trust(params, model, schema)
    pool, why_not = cam_layers(model)
    model = (
        WithCam(model, trust["temperature"], pool)
        if pool
        else WithFeatures(model, trust["temperature"])
    )
    names = ("output", "features", "cam") if pool else ("output", "features")
    export_onnx(model, torch.from_numpy(x_test[:2]), onnx_path, names)
    parity = check_parity(
        FirstOutput(model), onnx_path, x_test, p.parity_atol, True, p.min_top1_agreement
    )
    size = schema["image_size"]
    card = {
        **card_common(
            "image", "classification", onnx_path, ["batch", 3, size, size], meta, parity, p
        ),
        "classes": schema["classes"],
        "preprocessing": {
            "image_size": size,
            "mean": schema["mean"],
            "std": schema["std"],
            "mode": "RGB",
            "resize": "bilinear to image_size x image_size (aspect ratio not kept)",
            "scale": "x / 255",
            "layout": "NCHW float32",
        },
        "postprocessing": "softmax over output (the logits / trust.temperature, in the graph)",
        "reference": image_reference(schema, size),
        "trust": trust,
        # stages/image/cam.py; served as `heatmap_png` (app/predict.py)
        "explain": {
            "cam": "cam" if pool else None,
            **({"why_no_cam": why_not} if not pool else {}),
        },
    }
    card = write_card(out_dir / layout.card("image").name, card)
    log(
        f"exported {onnx_path} (parity: max abs diff {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['class_agreement']:.4f} over {parity['rows']} images)"
    )
    return card
