"""Trust for the image model (stages/core/trust.py): fitted on the validation images, with
the training images' penultimate features as the in-distribution reference; scored on the
test images. evaluate and export both call fit_trust (the same deterministic fit)."""

from __future__ import annotations

from stages.core import trust
from stages.core.onnx_export import outputs_and_features
from stages.core.schema import Params
from stages.image.data import preprocess, split_images


def _split(model, schema: dict, split: str):
    paths, y = split_images(schema, split)
    out, feats = outputs_and_features(model, preprocess(paths, schema))
    return out, feats, y.astype(int)


def fit_trust(params: Params, model, schema: dict) -> dict:
    """The card's `trust` section (image.evaluate.alpha and .ood_threshold)."""
    p = params.image.evaluate
    val_out, val_feats, val_y = _split(model, schema, "val")
    _, train_feats, train_y = _split(model, schema, "train")
    return trust.fit(
        p.alpha, p.ood_threshold, val_out, val_y, val_feats, train_feats, train_y, True
    )


def trust_report(params: Params, model, schema: dict) -> tuple[dict, dict]:
    """(test metrics, reliability plot rows) for evaluate."""
    fitted = fit_trust(params, model, schema)
    out, feats, y = _split(model, schema, "test")
    calibrated = trust.softmax(out.astype("float64") / fitted["temperature"])
    return trust.metrics(fitted, out, calibrated, y, feats)
