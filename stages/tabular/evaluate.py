"""evaluate: score the served model (the network, boosting, or both together: the boost
stage's weights) on the test split, each member on its own, and scikit-learn's
HistGradientBoosting on the same split and features as a baseline.

    python -m stages evaluate tabular

Outputs: metrics/tabular/metrics.json (`test`: the served model; `members`: each member's
test scores and the weights; `baseline_hgb`, `margin_over_hgb`, `cv`, ...) and plot data in
metrics/tabular/plots/ (confusion matrix, micro-averaged ROC and PR curves; predicted vs
actual for regression).
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
from stages.core.schema import Params
from stages.tabular.boost import BOOST_TIME, Served, load_served
from stages.tabular.data import Preprocessor, read_split, split_chunks
from stages.tabular.ensemble import combine
from stages.tabular.explain import importance_report
from stages.tabular.train import TRAIN_TIME
from stages.tabular.trust import trust_report

CHUNK_ROWS = 1_000_000


def run(params: Params, out_dir: Path = layout.metrics_dir("tabular")) -> dict:
    served = load_served()
    schema, prepared = served.schema, layout.prepared("tabular")

    def labels(df: pd.DataFrame) -> np.ndarray:
        return (
            pd.Categorical(df[schema.target], categories=schema.classes).codes
            if served.classify
            else df[schema.target].to_numpy("float64")
        )

    t0 = time.perf_counter()
    hgb = baseline(params, served.pre, prepared / "train.parquet", labels, served.classify)
    hgb_seconds = time.perf_counter() - t0
    y_test, members, base_out = test_outputs(served, hgb, labels)
    metrics, plots, warnings = score(
        served, y_test, combine(members, served.ensemble["weights"], served.classify)
    )
    trusted, trust_plots = trust_report(params, served)  # stages/core/trust.py
    importance_report(params, served.outputs, served.meta, served.pre, out_dir)
    metrics, plots = {**metrics, **trusted}, {**plots, **trust_plots}
    base_metrics = {}
    if hgb is not None:
        report = classification_report if served.classify else regression_report
        args = [schema.classes] if served.classify else []
        base_metrics = report(y_test, base_out, *args)[0]
    margin, cost = comparison(metrics, base_metrics, hgb_seconds if hgb is not None else None)
    result = {
        "test": metrics,
        "members": member_scores(served, y_test, members),
        **small_table_cv(prepared, schema, served.meta, params),
        "baseline_hgb": base_metrics,
        **margin,
        "test_rows": len(y_test),
        "warnings": warnings,
    }
    write_json(out_dir / layout.METRICS_FILE, result)
    write_json(out_dir / layout.COST.name, cost)
    for name, rows in plots.items():
        write_json(out_dir / "plots" / f"{name}.json", rows)
    show(result, cost)
    fail_if_untrained(warnings, "tabular", params)
    return result


def test_outputs(served: Served, hgb, labels) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """(the test labels, each member's outputs (ensemble.member_outputs), the baseline's),
    the test split read a million rows at a time: only labels and outputs stay in memory
    (the whole split as a frame and its features took 5x the CSV on 50M rows; `make bench`)."""
    y_test, members, base_out = [], [], []
    for df in split_chunks(layout.prepared("tabular") / "test.parquet", CHUNK_ROWS):
        x = served.pre.transform(df)
        y_test.append(labels(df))
        members.append(served.members(x))
        if hgb is not None:
            base_out.append(hgb.predict_proba(x) if served.classify else hgb.predict(x))
    joined = {m: np.concatenate([part[m] for part in members]) for m in members[0]}
    return np.concatenate(y_test), joined, np.concatenate(base_out) if base_out else None


def score(served: Served, y: np.ndarray, raw: np.ndarray) -> tuple[dict, dict, list]:
    """(metrics, plot rows, warnings) of a raw output (ensemble.combine's) on the test split."""
    if served.classify:
        classes = served.schema.classes
        metrics, plots = classification_report(y, softmax(raw.astype("float64")), classes)
        # Chance: always answering the test split's most common class.
        chance = float(pd.Series(y).value_counts(normalize=True).max())
        warnings = learned_nothing(
            "tabular", "accuracy", metrics["accuracy"], chance, "the majority-class share"
        )
        return metrics, plots, warnings
    scale = served.meta.target_scaling
    metrics, plots = regression_report(y, raw[:, 0] * scale["std"] + scale["mean"])
    return (
        metrics,
        plots,
        learned_nothing("tabular", "r2", metrics["r2"], 0.0, "predicting the mean"),
    )


def member_scores(served: Served, y: np.ndarray, members: dict) -> dict:
    """metrics.json's `members`: each member's test scores alone, the served weights and why
    (the served model's own scores are `test`)."""
    out = {m: score(served, y, combine(members, {m: 1.0}, served.classify))[0] for m in members}
    e = served.ensemble
    return {**out, "weights": e["weights"], "models": e["models"], "why": e["why"]}


def show(result: dict, cost: dict) -> None:
    def line(scores: dict) -> str:
        return " ".join(f"{k}={v:.4f}" for k, v in scores.items() if isinstance(v, float))

    members = result["members"]
    log(f"test (served, {members['models']}): {line(result['test'])}")
    for m, w in members["weights"].items():
        log(f"  {m} alone (weight {w:.2f}): {line(members[m])}")
    if result["baseline_hgb"]:
        log(f"  HistGradientBoosting baseline: {line(result['baseline_hgb'])}")
    if "margin_over_hgb" in result:
        log(
            "margin over HGB: "
            + " ".join(f"{k}={v:+.4f}" for k, v in result["margin_over_hgb"].items())
            + f" | train stage {cost['train_seconds']}s, boost stage {cost['boost_seconds']}s,"
            f" HGB fit {cost['hgb_fit_seconds']}s"
        )


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
    timing, boost_timing = timing_path(TRAIN_TIME), timing_path(BOOST_TIME)
    train_seconds = read_json(timing)["seconds"] if timing.is_file() else None
    boost_seconds = read_json(boost_timing)["seconds"] if boost_timing.is_file() else None
    cost = {
        "train_seconds": train_seconds,
        "boost_seconds": boost_seconds,
        "hgb_fit_seconds": None,
        "train_over_hgb": None,
    }
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
