"""boost: gradient boosting beside the trained network, and the weights that combine them,
fitted on the validation split (never test). What evaluate, export and trust call "the
served model" is loaded here (`load_served`).

    python -m stages boost tabular

Reads the network (models/tabular/model.pt) for its preprocessor, target scaling and
validation predictions, so both members see the same columns, roles and features. Writes
models/tabular/boosting.joblib (the fitted scikit-learn model) and ensemble.json (members,
weights, validation losses and why: stages/tabular/ensemble.py), which export puts in the
card. A stage of its own, not part of train: a change of tabular.boost refits the boosting
model and weights without retraining the network. The training split is read into memory
(as evaluate's HGB baseline does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from stages.core import layout
from stages.core.cli import log
from stages.core.documents import Columns, Meta
from stages.core.files import atomic_path, read_json, write_json, write_timing
from stages.core.onnx_export import load_model, predict
from stages.core.schema import Params
from stages.tabular.data import Preprocessor, read_split
from stages.tabular.ensemble import chosen, combine, fit_boosting, member_outputs, val_problem
from stages.tabular.model import build_model

BOOST_TIME = "boost-tabular"  # .cache/timings/boost-tabular.json, read by evaluate


def labels(df: pd.DataFrame, meta: Meta) -> np.ndarray:
    """What boosting is fitted on: class codes, or the target standardised as the network's."""
    schema = meta.columns()
    target = df[schema.target]
    if schema.task == "classification":
        return pd.Categorical(target, categories=schema.classes).codes.astype(np.int64)
    scale = meta.target_scaling
    return (target.to_numpy("float64") - scale["mean"]) / scale["std"]


def fit(params: Params, model, meta: Meta, pre: Preprocessor) -> tuple[object | None, dict]:
    """(the boosting model or None, the card's `ensemble` section)."""
    p, prepared = params.tabular.boost, layout.prepared("tabular")
    classes = meta.columns().classes
    classify = meta.columns().task == "classification"
    train_df, val_df = read_split(prepared / "train.parquet"), read_split(prepared / "val.parquet")
    x, y = pre.transform(train_df), labels(train_df, meta)
    x_val, y_val = pre.transform(val_df), labels(val_df, meta)
    problem = val_problem(y_val, classify)
    boosting, why_not = None, None
    if classify and len(np.unique(y)) < len(classes):
        why_not = "the training split lacks a class, which the boosting model could not output"
    else:
        stop = problem is None
        boosting = fit_boosting(
            x, y, x_val if stop else None, y_val if stop else None, classify, p, params.seed
        )
    preds = member_outputs(
        predict(model, x_val),
        None
        if boosting is None
        else (boosting.predict_proba if classify else boosting.predict)(x_val),
        classify,
    )
    section = chosen(p.models, preds, y_val, classify, p.rounds, problem or why_not)
    if boosting is not None:
        section["boosting_iterations"] = int(boosting.n_iter_)
    return boosting, section


def run(params: Params) -> dict:
    import joblib

    t0 = time.perf_counter()
    model, meta = load_model(layout.model_pt("tabular"), build_model)
    pre = Preprocessor.from_dict(meta.preprocessor)
    boosting, section = fit(params, model, meta, pre)
    with atomic_path(layout.boosting("tabular")) as tmp:
        joblib.dump(boosting, tmp)
    write_json(layout.ensemble("tabular"), section)
    write_timing(BOOST_TIME, {"seconds": round(time.perf_counter() - t0, 2)})
    weights = " ".join(f"{m}={w:.2f}" for m, w in section["weights"].items())
    log(f"served: {weights} ({section['why']})")
    return section


@dataclass
class Served:
    """The served model in Python: the network, the boosting model and their weights."""

    model: object  # the torch network, in eval mode
    meta: Meta
    pre: Preprocessor
    boosting: object | None
    ensemble: dict

    @cached_property
    def schema(self) -> Columns:
        """The prepared columns the members were fitted on (target, task, classes)."""
        return self.meta.columns()

    @property
    def classify(self) -> bool:
        return self.schema.task == "classification"

    @property
    def boosted(self) -> bool:
        """Whether the served graph holds the boosting model (its weight is above 0)."""
        return self.ensemble["weights"].get("boosting", 0) > 0

    def members(self, x: np.ndarray) -> dict[str, np.ndarray]:
        b = self.boosting
        pred = None if b is None else (b.predict_proba if self.classify else b.predict)(x)
        return member_outputs(predict(self.model, x), pred, self.classify)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The served raw output (stages/tabular/ensemble.py combine), before temperature."""
        return combine(self.members(x), self.ensemble["weights"], self.classify)


def load_served() -> Served:
    import joblib

    model, meta = load_model(layout.model_pt("tabular"), build_model)
    pre = Preprocessor.from_dict(meta.preprocessor)
    boosting = joblib.load(layout.boosting("tabular"))
    return Served(model, meta, pre, boosting, read_json(layout.ensemble("tabular")))
