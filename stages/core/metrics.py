"""Test metrics and plot rows shared by the classifiers and the regressor (scikit-learn)."""

from __future__ import annotations

import numpy as np

from stages.core import layout
from stages.core.schema import Params


def classification_report(
    y: np.ndarray, probs: np.ndarray, classes: list[str]
) -> tuple[dict, dict]:
    """Metrics and plot rows. ROC/PR are micro-averaged (one curve for any number of classes)."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    pred = probs.argmax(1)
    onehot = np.eye(len(classes))[y]
    if len(classes) == 2:
        auc = roc_auc_score(y, probs[:, 1])
        scores, truth = probs[:, 1], y
    else:
        auc = roc_auc_score(
            y, probs, multi_class="ovr", average="macro", labels=list(range(len(classes)))
        )
        scores, truth = probs.ravel(), onehot.ravel()
    fpr, tpr, _ = roc_curve(truth, scores)
    precision, recall, _ = precision_recall_curve(truth, scores)
    metrics = {
        "accuracy": accuracy_score(y, pred),
        "f1_macro": f1_score(y, pred, average="macro"),
        "roc_auc": auc,
    }
    rows, roc, pr = _sampled(len(y)), _thinned(len(fpr)), _thinned(len(recall))
    plots = {
        "confusion": [
            {"actual": classes[a], "predicted": classes[p]}
            for a, p in zip(y[rows], pred[rows], strict=False)
        ],
        "roc": [
            {"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr[roc], tpr[roc], strict=False)
        ],
        "pr": [
            {"recall": float(r), "precision": float(p)}
            for r, p in zip(recall[pr], precision[pr], strict=False)
        ],
    }
    return {k: float(v) for k, v in metrics.items()}, plots


def regression_report(y: np.ndarray, pred: np.ndarray) -> tuple[dict, dict]:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    metrics = {
        "rmse": float(np.sqrt(mean_squared_error(y, pred))),
        "mae": float(mean_absolute_error(y, pred)),
        "r2": float(r2_score(y, pred)),
    }
    rows = _sampled(len(y))
    return metrics, {
        "predicted": [
            {"actual": float(a), "predicted": float(p)}
            for a, p in zip(y[rows], pred[rows], strict=False)
        ]
    }


# Plot files hold a row per test row (DVC's confusion and scatter templates count rows) and a
# point per curve threshold: on 7.5M test rows that was gigabytes of JSON and most of
# evaluate's memory (`python -m tools.bench --only large`). Beyond these sizes the rows are
# every k-th test row (the same shares) and the curves keep evenly spaced points, both ends
# included; the metrics are always computed on every row.
PLOT_ROWS = 20_000
CURVE_POINTS = 2_000


def _sampled(n: int) -> slice:
    return slice(None, None, max(1, -(-n // PLOT_ROWS)))


def _thinned(n: int) -> np.ndarray:
    return (
        np.arange(n)
        if n <= CURVE_POINTS
        else np.unique(np.linspace(0, n - 1, CURVE_POINTS).round().astype(int))
    )


FIXES = {
    "tabular": "more rows, more epochs (tabular.train.epochs), a higher learning rate (tabular.train.lr), "
    "or features that carry the target",
    "image": "start from weights (image.train.pretrained: a .pth state dict or an earlier "
    f"{layout.model_pt('image')}), "
    "more epochs (image.train.epochs), more images per class",
    "detect": "start from weights (detect.train.model: a .pt such as an earlier "
    f"{layout.model_pt('detect')}; training "
    "from scratch needs thousands of images), more epochs (detect.train.epochs), more labelled images",
}


def learned_nothing(
    task: str, metric: str, value: float, floor: float, floor_name: str
) -> list[str]:
    """The "learned nothing" check of evaluate: [] when `value` beats `floor`, else one
    warning sentence, printed; the caller writes it to metrics.json under `warnings` (export
    copies metrics.json into the model card), then calls fail_if_untrained."""
    if value > floor:
        return []
    text = (
        f"the {task} model learned nothing: test {metric} {value:.4g} is not above {floor_name} ({floor:.4g}); "
        f"likely too little data or too few epochs for training from scratch. Try: {FIXES[task]}"
    )
    from stages.core.cli import log

    log(f"warning: {text}")
    return [text]


def fail_if_untrained(warnings: list[str], task: str, params: Params) -> None:
    """`<task>.evaluate.fail_if_untrained: true` turns the warning into a failed stage
    (after metrics.json is written, so the record says why)."""
    if warnings and getattr(params, task).evaluate.fail_if_untrained:
        from stages.core.cli import StageError

        raise StageError(f"{warnings[0]} ({task}.evaluate.fail_if_untrained is true)")
