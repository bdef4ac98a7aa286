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

from stages.core import label_issues, layout
from stages.core.cli import StageError, log
from stages.core.documents import Columns
from stages.core.schema import Params, TabularLabels
from stages.core.splits import NAMES
from stages.tabular.data import Preprocessor, read_split

EXCLUDED = len(NAMES)  # a split code after train, val and test (0, 1, 2): rows in no split


def exclude(codes: np.ndarray, lines: list, source: str) -> np.ndarray:
    """prepare's split codes (row i = CSV line i + 2) with the rows of
    `tabular.data.exclude_lines` set to EXCLUDED, a code no split takes. The split is drawn first, so
    every other row stays in the split it had: runs with and without the exclusions compare."""
    if not lines:
        return codes
    try:
        at = np.asarray(lines, dtype=np.int64)
    except (TypeError, ValueError):
        raise StageError(
            f"tabular.data.exclude_lines: {lines!r} is not a list of line numbers"
        ) from None
    outside = at[(at < 2) | (at >= len(codes) + 2)]
    if len(outside):
        raise StageError(
            f"tabular.data.exclude_lines: line {outside[0]} is not a data line of {source} "
            f"(lines 2 to {len(codes) + 1}; header = 1)"
        )
    codes = codes.copy()
    codes[at - 2] = EXCLUDED
    log(
        f"excluded {len(set(at.tolist()))} lines of {source} from every split (tabular.data.exclude_lines)"
    )
    return codes


def fold_model(
    df: pd.DataFrame, labels: np.ndarray, kinds: dict, p: TabularLabels, n_classes: int, seed: int
):
    """fit_predict for label_issues.out_of_fold: the preprocessor and an MLP fitted on the fold."""
    import torch

    from stages.tabular.model import build_model

    def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        pre = Preprocessor.fit(df.iloc[train], kinds)
        torch.manual_seed(seed)  # the fold's initial weights: outputs reproduce byte for byte
        arch = {
            "kind": "mlp",
            "n_in": pre.n_features,
            "hidden": list(p.hidden),
            "n_out": n_classes,
            "dropout": float(p.dropout),
        }
        model = label_issues.fit_network(
            build_model(arch),
            torch.from_numpy(pre.transform(df.iloc[train])),
            torch.from_numpy(labels[train]),
            p.epochs,
            p.batch_size,
            p.lr,
            seed,
        )
        return label_issues.predict_proba(model, torch.from_numpy(pre.transform(df.iloc[held])))

    return fit_predict


def find(df: pd.DataFrame, schema: Columns, p: TabularLabels, seed: int) -> pd.DataFrame:
    """The pure core: the suspected errors of a frame indexed by CSV line."""
    classes = schema.classes
    labels = pd.Categorical(df[schema.target], categories=classes).codes.astype(np.int64)
    kinds = {f.name: f.type for f in schema.features}
    fit_predict = fold_model(df, labels, kinds, p, len(classes), seed)
    probs = label_issues.out_of_fold(labels, len(classes), p.folds, seed, fit_predict)
    return label_issues.find(df.index.tolist(), labels, probs, classes)


def run(
    params: Params,
    prepared: Path = layout.prepared("tabular"),
    out: Path = layout.label_issues("tabular"),
) -> dict:
    p = params.tabular.labels
    schema = Columns.read(Path(prepared) / layout.columns("tabular").name)
    if schema.task != "classification":
        return label_issues.skip(
            "tabular", "a regression target has no class labels to check", Path(out)
        )
    df = pd.concat([read_split(Path(prepared) / f"{name}.parquet") for name in NAMES]).sort_index()
    issues = find(df, schema, p, params.seed)
    summary = label_issues.write(issues, len(df), {"folds": p.folds}, Path(out))
    label_issues.report(Path(out), issues, summary)
    return summary
