"""evaluate: score the MLP on the test split, beside scikit-learn's HistGradientBoosting on
the same split and features.

    python -m stages evaluate tabular

Outputs: metrics/tabular/metrics.json and plot data in metrics/tabular/plots/ (confusion
matrix, micro-averaged ROC and PR curves; predicted vs actual for regression).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import layout
from stages.core.cli import log
from stages.core.documents import Columns, Meta
from stages.core.files import read_json, timing_path, write_json
from stages.core.inference import softmax
from stages.core.metrics import (
    classification_report,
    fail_if_untrained,
    learned_nothing,
    regression_report,
)
from stages.core.onnx_export import load_model, predict
from stages.core.schema import Params
from stages.tabular.data import Preprocessor, read_split, split_chunks
from stages.tabular.explain import importance_report
from stages.tabular.model import build_model
from stages.tabular.train import TRAIN_TIME
from stages.tabular.trust import trust_report

CHUNK_ROWS = 1_000_000


def run(params: Params, out_dir: Path = layout.metrics_dir("tabular")) -> dict:
    model, meta = load_model(layout.model_pt("tabular"), build_model)
    schema, pre = meta.columns(), Preprocessor.from_dict(meta.preprocessor)
    prepared = layout.prepared("tabular")
    target, classify = schema.target, schema.task == "classification"
    classes = schema.classes

    def labels(df: pd.DataFrame) -> np.ndarray:
        return (
            pd.Categorical(df[target], categories=classes).codes
            if classify
            else df[target].to_numpy("float64")
        )

    t0 = time.perf_counter()
    hgb = baseline(params, pre, prepared / "train.parquet", labels, classify)
    hgb_seconds = time.perf_counter() - t0
    # The test split a million rows at a time: only the labels and outputs stay in memory
    # (the whole split as a frame and its features took 5x the CSV on 50M rows; `make bench`).
    y_test, out, base_out = [], [], []
    for df in split_chunks(prepared / "test.parquet", CHUNK_ROWS):
        x = pre.transform(df)
        y_test.append(labels(df))
        out.append(predict(model, x))
        if hgb is not None:
            base_out.append(hgb.predict_proba(x) if classify else hgb.predict(x))
    y_test, out = np.concatenate(y_test), np.concatenate(out)
    if classify:
        metrics, plots = classification_report(y_test, softmax(out.astype("float64")), classes)
        # Chance: always answering the test split's most common class.
        warnings = learned_nothing(
            "tabular",
            "accuracy",
            metrics["accuracy"],
            float(pd.Series(y_test).value_counts(normalize=True).max()),
            "the majority-class share",
        )
    else:
        scale = meta.target_scaling
        metrics, plots = regression_report(y_test, out[:, 0] * scale["std"] + scale["mean"])
        warnings = learned_nothing("tabular", "r2", metrics["r2"], 0.0, "predicting the mean")
    trusted, trust_plots = trust_report(params, model, meta, pre)  # stages/core/trust.py
    importance_report(params, lambda z: predict(model, z), meta, pre, out_dir)
    metrics, plots = {**metrics, **trusted}, {**plots, **trust_plots}
    base_metrics = {}
    if hgb is not None:
        report = classification_report if classify else regression_report
        base_metrics = report(y_test, np.concatenate(base_out), *([classes] if classify else []))[0]
    margin, cost = comparison(metrics, base_metrics, hgb_seconds if hgb is not None else None)
    result = {
        "test": metrics,
        **small_table_cv(prepared, schema, meta, params),
        "baseline_hgb": base_metrics,
        **margin,
        "test_rows": len(y_test),
        "warnings": warnings,
    }
    write_json(out_dir / "metrics.json", result)
    write_json(out_dir / layout.COST.name, cost)
    for name, rows in plots.items():
        write_json(out_dir / "plots" / f"{name}.json", rows)
    log(
        "test: "
        + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        + (
            " | HistGradientBoosting: " + " ".join(f"{k}={v:.4f}" for k, v in base_metrics.items())
            if base_metrics
            else ""
        )
    )
    if "margin_over_hgb" in result:
        c = cost
        log(
            "margin over HGB: "
            + " ".join(f"{k}={v:+.4f}" for k, v in result["margin_over_hgb"].items())
            + f" | train stage {c['train_seconds']}s, HGB fit {c['hgb_fit_seconds']}s"
        )
    fail_if_untrained(warnings, "tabular", params)
    return result


def small_table_cv(prepared: Path, schema: Columns, meta: Meta, params: Params) -> dict:
    """`cv` (K-fold metrics on small tables; stages/tabular/cv.py) and what prepare decided:
    the task, the column roles, rows dropped, warnings."""
    from stages.tabular.cv import cv_metrics

    out = {
        "task": schema.task,
        "columns": {c["column"]: c["role"] for c in schema.columns or []},
        "dropped_rows": schema.dropped_rows or {},
        "data_warnings": schema.warnings or [],
    }
    cv = cv_metrics(prepared, schema, meta.arch, params)
    return {**out, **({"cv": cv} if cv else {})}


def comparison(metrics: dict, base_metrics: dict, hgb_seconds: float | None) -> tuple[dict, dict]:
    """(the network's margin over HGB on the headline score (accuracy or R², higher is
    better), for metrics.json; the cost: the train stage's wall time beside HGB's fit time,
    reading the split included). The cost goes to a file of its own that is no DVC output
    (layout.cost): times differ run to run, and outputs reproduce byte for byte."""
    score = "accuracy" if "accuracy" in metrics else "r2"
    margin = (
        {"margin_over_hgb": {score: metrics[score] - base_metrics[score]}} if base_metrics else {}
    )
    timing = timing_path(TRAIN_TIME)
    train_seconds = read_json(timing)["seconds"] if timing.is_file() else None
    cost = {"train_seconds": train_seconds, "hgb_fit_seconds": None, "train_over_hgb": None}
    if hgb_seconds is not None:
        cost["hgb_fit_seconds"] = round(hgb_seconds, 2)
        if train_seconds is not None:
            cost["train_over_hgb"] = round(train_seconds / max(hgb_seconds, 1e-3), 1)
    return margin, cost


def baseline(params: Params, pre: Preprocessor, train_path: Path, labels, classify: bool):
    """scikit-learn's HistGradientBoosting fitted on the same split and preprocessed features
    as the MLP, or None (`tabular.evaluate.baseline: false`). It needs the training split in
    memory: on data larger than memory, turn it off."""
    if not params.tabular.evaluate.baseline:
        return None
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    train_df = read_split(train_path)
    model = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
    return model(random_state=params.seed).fit(pre.transform(train_df), labels(train_df))
