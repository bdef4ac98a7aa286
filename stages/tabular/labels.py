"""labels: suspected label errors in the tabular table (stages/core/label_issues.py).

    python -m stages labels tabular   # → metrics/tabular/label_issues.csv and .json

Every prepared row (train, val and test) is held out once by a K-fold of the project's MLP
(`tabular.labels`: fewer epochs than train, the same kind of network); cleanlab lists the
rows whose given class the held-out model finds unlikely. `line` is the row's CSV line
(header = 1), the line `tabular.data.exclude_lines` takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import label_issues
from stages.core.files import read_json
from stages.core.splits import NAMES
from stages.tabular.data import Preprocessor, read_split


def fold_model(
    df: pd.DataFrame, labels: np.ndarray, kinds: dict, p: dict, n_classes: int, seed: int
):
    """fit_predict for label_issues.out_of_fold: the preprocessor and an MLP fitted on the fold."""
    import torch

    from stages.tabular.model import build_model

    def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        pre = Preprocessor.fit(df.iloc[train], kinds)
        arch = {
            "kind": "mlp",
            "n_in": pre.n_features,
            "hidden": list(p["hidden"]),
            "n_out": n_classes,
            "dropout": 0.1,
        }
        model = label_issues.fit_network(
            build_model(arch),
            torch.from_numpy(pre.transform(df.iloc[train])),
            torch.from_numpy(labels[train]),
            p["epochs"],
            p["batch_size"],
            p["lr"],
            seed,
        )
        return label_issues.predict_proba(model, torch.from_numpy(pre.transform(df.iloc[held])))

    return fit_predict


def find(df: pd.DataFrame, schema: dict, p: dict, seed: int) -> pd.DataFrame:
    """The pure core: the suspected errors of a frame indexed by CSV line."""
    classes = schema["classes"]
    labels = pd.Categorical(df[schema["target"]], categories=classes).codes.astype(np.int64)
    kinds = {f["name"]: f["type"] for f in schema["features"]}
    fit_predict = fold_model(df, labels, kinds, p, len(classes), seed)
    probs = label_issues.out_of_fold(labels, len(classes), p["folds"], seed, fit_predict)
    return label_issues.find(df.index.tolist(), labels, probs, classes)


def run(params: dict, prepared: str = "data/prepared/tabular", out_dir: str = "metrics") -> dict:
    p = params["tabular"]["labels"]
    schema = read_json(Path(prepared) / "schema.json")
    if schema["task"] != "classification":
        return label_issues.skip(
            "tabular", "a regression target has no class labels to check", out_dir
        )
    df = pd.concat([read_split(Path(prepared) / f"{name}.parquet") for name in NAMES]).sort_index()
    issues = find(df, schema, p, params["seed"])
    summary = label_issues.write("tabular", issues, len(df), {"folds": p["folds"]}, out_dir)
    label_issues.report("tabular", issues, summary)
    return summary
