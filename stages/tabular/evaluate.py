"""evaluate: score the MLP on the test split, beside scikit-learn's HistGradientBoosting on
the same split and features.

    python -m stages evaluate tabular

Outputs: metrics/tabular/metrics.json and plot data in metrics/tabular/plots/ (confusion
matrix, micro-averaged ROC and PR curves; predicted vs actual for regression).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.core.common import log, write_json
from stages.core.inference import softmax
from stages.core.metrics import classification_report, fail_if_untrained, learned_nothing, regression_report
from stages.core.models import load_model, predict
from stages.tabular.data import Preprocessor
from stages.tabular.model import build_model


def run(params: dict, out_dir: Path = Path("metrics/tabular")) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    model, meta = load_model("models/tabular/model.pt", build_model)
    schema, pre = meta["schema"], Preprocessor.from_dict(meta["preprocessor"])
    prepared = Path("data/prepared/tabular")
    test_df = pd.read_parquet(prepared / "test.parquet")
    x_test = pre.transform(test_df)
    target, classify = schema["target"], schema["task"] == "classification"
    out = predict(model, x_test)
    if classify:
        classes = schema["classes"]
        y_test = pd.Categorical(test_df[target], categories=classes).codes
        metrics, plots = classification_report(y_test, softmax(out.astype("float64")), classes)
        # Chance: always answering the test split's most common class.
        warnings = learned_nothing("tabular", "accuracy", metrics["accuracy"],
                                   float(pd.Series(y_test).value_counts(normalize=True).max()), "the majority-class share")
    else:
        scale = meta["target_scaling"]
        y_test = test_df[target].to_numpy("float64")
        metrics, plots = regression_report(y_test, out[:, 0] * scale["std"] + scale["mean"])
        warnings = learned_nothing("tabular", "r2", metrics["r2"], 0.0, "predicting the mean")
    base_metrics = {}
    if params["tabular"]["evaluate"]["baseline"]:
        # The baseline sees the same split and the same preprocessed features as the MLP. The
        # training split is read only for it: on data larger than memory, turn it off.
        train_df = pd.read_parquet(prepared / "train.parquet")
        x_train = pre.transform(train_df)
        y_train = pd.Categorical(train_df[target], categories=classes).codes if classify \
            else train_df[target].to_numpy("float64")
        if classify:
            hgb = HistGradientBoostingClassifier(random_state=params["seed"]).fit(x_train, y_train)
            base_metrics = classification_report(y_test, hgb.predict_proba(x_test), classes)[0]
        else:
            hgb = HistGradientBoostingRegressor(random_state=params["seed"]).fit(x_train, y_train)
            base_metrics = regression_report(y_test, hgb.predict(x_test))[0]
    result = {"test": metrics, "baseline_hgb": base_metrics, "test_rows": len(test_df), "warnings": warnings}
    write_json(out_dir / "metrics.json", result)
    for name, rows in plots.items():
        write_json(out_dir / "plots" / f"{name}.json", rows)
    log("test: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        + (" | HistGradientBoosting: " + " ".join(f"{k}={v:.4f}" for k, v in base_metrics.items())
           if base_metrics else ""))
    fail_if_untrained(warnings, "tabular", params)
    return result
