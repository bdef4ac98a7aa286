"""evaluate: score the image model on the test split, with per-class precision and recall
and a contact sheet of the most confident mistakes.

    python -m stages evaluate image
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.core import layout
from stages.core.cli import log
from stages.core.files import write_json
from stages.core.inference import softmax
from stages.core.metrics import classification_report, fail_if_untrained, learned_nothing
from stages.core.onnx_export import load_model, predict
from stages.core.schema import Params
from stages.image.data import contact_sheet, preprocess, split_images
from stages.image.model import build_model
from stages.image.trust import trust_report


def run(params: Params, out_dir: Path = layout.metrics_dir("image")) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    model, meta = load_model(layout.model_pt("image"), build_model)
    schema = meta.prepared  # image prepare's description (ImageIndex), as preprocess reads it
    classes = schema["classes"]
    paths, y = split_images(schema)
    probs = softmax(predict(model, preprocess(paths, schema)).astype("float64"))
    metrics, plots = classification_report(y, probs, classes)
    precision, recall, _, support = precision_recall_fscore_support(
        y, probs.argmax(1), labels=range(len(classes)), zero_division=0
    )
    metrics["per_class"] = {
        c: {"precision": float(p), "recall": float(r), "support": int(n)}
        for c, p, r, n in zip(classes, precision, recall, support, strict=False)
    }
    majority = float(
        np.bincount(y, minlength=len(classes)).max() / max(len(y), 1)
    )  # always the commonest class
    warnings = learned_nothing(
        "image", "accuracy", metrics["accuracy"], majority, "the majority-class share"
    )
    trusted, trust_plots = trust_report(params, model, schema)  # stages/core/trust.py
    metrics, plots = {**metrics, **trusted}, {**plots, **trust_plots}
    result = {"test": metrics, "test_images": len(paths), "warnings": warnings}
    write_json(out_dir / layout.METRICS_FILE, result)
    for name, rows in plots.items():
        write_json(out_dir / "plots" / f"{name}.json", rows)
    # The worst mistakes: wrong predictions made with the most confidence.
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: params.image.evaluate.worst]
    contact_sheet(
        [(paths[i], f"{classes[y[i]]}->{classes[pred[i]]} {probs[i, pred[i]]:.2f}") for i in wrong],
        out_dir / "plots" / "mistakes.png",
    )
    log(
        f"test: accuracy={metrics['accuracy']:.4f} f1_macro={metrics['f1_macro']:.4f} on {len(paths)} images, "
        f"{len(np.flatnonzero(pred != y))} mistakes → {out_dir}/plots/mistakes.png"
    )
    fail_if_untrained(warnings, "image", params)
    return result
