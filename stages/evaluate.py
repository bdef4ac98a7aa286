"""evaluate: score the trained model on the test split, beside a scikit-learn baseline.

    python -m stages.evaluate tabular

Outputs: metrics/<task>/metrics.json and plot data in metrics/<task>/plots/
(confusion matrix, micro-averaged ROC and PR curves; predicted vs actual for regression).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.common import log, read_json, run_stage, write_json
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
    target = schema["target"]
    out = predict(model, x_test)
    if schema["task"] == "classification":
        classes = schema["classes"]
        y_train, y_test = (pd.Categorical(d[target], categories=classes).codes for d in (train_df, test_df))
        metrics, plots = classification_report(y_test, softmax(out.astype("float64")), classes)
        baseline = HistGradientBoostingClassifier(random_state=params["seed"]).fit(x_train, y_train)
        base_metrics, _ = classification_report(y_test, baseline.predict_proba(x_test), classes)
    else:
        scale = meta["target_scaling"]
        y_train, y_test = train_df[target].to_numpy("float64"), test_df[target].to_numpy("float64")
        metrics, plots = regression_report(y_test, out[:, 0] * scale["std"] + scale["mean"])
        baseline = HistGradientBoostingRegressor(random_state=params["seed"]).fit(x_train, y_train)
        base_metrics, _ = regression_report(y_test, baseline.predict(x_test))
    result = {"test": metrics, "baseline_hgb": base_metrics, "test_rows": len(test_df)}
    write_json(out_dir / "metrics.json", result)
    for name, rows in plots.items():
        write_json(out_dir / "plots" / f"{name}.json", rows)
    log("test: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        + " | HistGradientBoosting: " + " ".join(f"{k}={v:.4f}" for k, v in base_metrics.items()))
    return result


def evaluate_image(params: dict, out_dir: Path = Path("metrics/image"), worst: int = 24) -> dict:
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
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:worst]
    contact_sheet([(paths[i], f"{classes[y[i]]}->{classes[pred[i]]} {probs[i, pred[i]]:.2f}") for i in wrong],
                  out_dir / "plots" / "mistakes.png")
    log(f"test: accuracy={metrics['accuracy']:.4f} f1_macro={metrics['f1_macro']:.4f} on {len(paths)} images, "
        f"{len(np.flatnonzero(pred != y))} mistakes → {out_dir}/plots/mistakes.png")
    return result


if __name__ == "__main__":
    run_stage({"tabular": evaluate_tabular, "image": evaluate_image})
