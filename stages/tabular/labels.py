"""labels: suspected label errors in the tabular table (stages/core/label_issues.py).

    python -m stages labels tabular   # → metrics/tabular/label_issues.csv and .json

Every prepared row (train, val and test) is held out once by a K-fold of the project's MLP
(`tabular.labels`: fewer epochs than train, the same kind of network) and, when the
served model holds gradient boosting (models/tabular/ensemble.json), of boosting too, mixed
with the served weights; cleanlab lists the rows whose given class the held-out model
finds unlikely. `line` is the row's CSV line (header = 1), the line
`tabular.data.exclude_lines` takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import label_issues, layout
from stages.core.cli import StageError, log
from stages.core.documents import Columns
from stages.core.files import read_json
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


def fold_boosting(x, y, held, n_classes: int, ensemble: dict, boost, seed: int) -> np.ndarray:
    """The fold's boosting probabilities: the served model's settings and iteration count
    (there is no validation split in a fold to stop on), every class a column."""
    from stages.tabular.ensemble import fit_boosting

    settings = boost.model_copy(update={"max_iter": ensemble.get("boosting_iterations", 100)})
    model = fit_boosting(x, y, None, None, True, settings, seed)
    probs = np.zeros((len(held), n_classes))
    probs[:, model.classes_] = model.predict_proba(held)
    return probs


def fold_model(
    df: pd.DataFrame,
    labels: np.ndarray,
    features: list,
    p: TabularLabels,
    n_classes: int,
    seed: int,
    served: tuple | None = None,
):
    """fit_predict for label_issues.out_of_fold: the preprocessor (train's plan: columns.json's
    roles and date formats) and an MLP fitted on the fold; `served` (the ensemble section,
    tabular.boost): boosting too, with the served weights. A held-out row with a value the fold
    never saw (a category whose only rows are held out) is read as serving reads it: unknown."""
    import torch

    from stages.tabular.model import build_model

    def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        pre = Preprocessor.fit_features(df.iloc[train], features)
        torch.manual_seed(seed)  # the fold's initial weights: outputs reproduce byte for byte
        arch = {
            "name": "mlp",
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
        x_held = pre.transform(pre.screen(df.iloc[held])[0])
        probs = label_issues.predict_proba(model, torch.from_numpy(x_held))
        if served is None:
            return probs
        ensemble, boost = served
        w = ensemble["weights"]
        boosted = fold_boosting(
            pre.transform(df.iloc[train]), labels[train], x_held, n_classes, ensemble, boost, seed
        )
        return w["network"] * probs + w["boosting"] * boosted

    return fit_predict


def find(
    df: pd.DataFrame, schema: Columns, p: TabularLabels, seed: int, served: tuple | None = None
) -> pd.DataFrame:
    """The pure core: the suspected errors of a frame indexed by CSV line."""
    classes = schema.classes
    labels = pd.Categorical(df[schema.target], categories=classes).codes.astype(np.int64)
    fit_predict = fold_model(df, labels, schema.features, p, len(classes), seed, served)
    probs = label_issues.out_of_fold(labels, len(classes), p.folds, seed, fit_predict)
    return label_issues.find(df.index.tolist(), labels, probs, classes)


def run(
    params: Params,
    prepared: Path = layout.prepared("tabular"),
    out: Path = layout.label_issues("tabular"),
    ensemble: Path = layout.ensemble("tabular"),
) -> dict:
    """`ensemble`: the boost stage's members and weights (dvc runs labels after it); without
    the file (a bare call), the folds fit the network alone."""
    p = params.tabular.labels
    schema = Columns.read(Path(prepared) / layout.columns("tabular").name)
    if schema.task != "classification":
        return label_issues.skip(
            "tabular", "a regression target has no class labels to check", Path(out)
        )
    df = pd.concat([read_split(Path(prepared) / f"{name}.parquet") for name in NAMES]).sort_index()
    weights = {"network": 1.0}
    served = None
    if Path(ensemble).is_file():
        section = read_json(ensemble)
        weights = {m: w for m, w in section["weights"].items() if w > 0}
        served = (section, params.tabular.boost) if "boosting" in weights else None
    issues = find(df, schema, p, params.seed, served)
    summary = label_issues.write(issues, len(df), {"folds": p.folds, "members": weights}, Path(out))
    label_issues.report(Path(out), issues, summary)
    return summary
