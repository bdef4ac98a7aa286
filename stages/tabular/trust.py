"""Trust for the served tabular model (stages/core/trust.py; the network, or the network and
boosting together: stages/tabular/boost.py Served): fitted on the validation split, with
the training split's penultimate features as the in-distribution reference; scored on the
test split. evaluate and export both call fit_trust (the same deterministic fit), so the
card carries the numbers that metrics.json scored.

OOD reads the preprocessed input row, not the penultimate features: the validation split
picks the best epoch (early stopping on val_loss), so features of a network fitted to it
were closer to the training data than the test split's (penguins: 16% of the test split
had p <= 0.05, against 1.4% for the input), while the input is the same function for every
split, so the p-values are exactly valid. A distance in the input still flags what the
network never saw (every number 1e6).

Large splits are read as every k-th row up to FIT_ROWS (sample_split): conformal
calibration and a Gaussian fit need thousands of rows, not millions.
"""

from __future__ import annotations

import pandas as pd

from stages.core import layout, trust
from stages.core.schema import Params
from stages.tabular.data import sample_split

FIT_ROWS = 200_000


def _split(served, split: str):
    """(served raw outputs, features, labels or target values in their units) of a split's
    sample."""
    meta, pre = served.meta, served.pre
    schema = served.schema
    target = schema.target
    df, _ = sample_split(
        layout.prepared("tabular") / f"{split}.parquet", [*pre.columns, target], FIT_ROWS
    )
    x = pre.transform(df)
    out = served.outputs(x)
    feats = x  # OOD reads the input row (space "input"): see the module docstring
    if schema.task == "classification":
        y = pd.Categorical(df[target], categories=schema.classes).codes.astype(int)
        return out, feats, y
    scale = meta.target_scaling
    values = out[:, :1].astype("float64") * scale["std"] + scale["mean"]
    return values, feats, df[target].to_numpy("float64")


def fit_trust(params: Params, served) -> dict:
    """The card's `trust` section (tabular.evaluate.alpha and .ood_threshold)."""
    p = params.tabular.evaluate
    classify = served.classify
    val_out, val_feats, val_y = _split(served, "val")
    _, train_feats, train_y = _split(served, "train")
    return trust.fit(
        p.alpha,
        p.ood_threshold,
        val_out,
        val_y,
        val_feats,
        train_feats,
        train_y,
        classify,
        "input",
    )


def trust_report(params: Params, served) -> tuple[dict, dict]:
    """(test metrics: ece_uncalibrated, ece, coverage, mean set size or interval width, OOD
    shares; reliability plot rows) for evaluate."""
    fitted = fit_trust(params, served)
    out, feats, y = _split(served, "test")
    if fitted["temperature"] is None:
        return trust.metrics(fitted, None, out, y, feats)
    calibrated = trust.softmax(out.astype("float64") / fitted["temperature"])
    return trust.metrics(fitted, out, calibrated, y, feats)
