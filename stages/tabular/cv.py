"""K-fold cross-validated metrics for small tables: a 6-row test split says little, so
below `tabular.evaluate.cv_below` rows evaluate also trains the same network K times on
the whole table (every split together), each time fitting the preprocessor on the other
folds, and reports each metric's mean and standard deviation as `cv` beside `test`.

The folds use a plain loop (AdamW at the trained lr and weight decay, the trained epochs
and batch size, no early stopping, scheduler or checkpoints): the shared trainer
(stages/core/trainer.py) is built around one run's files, DVCLive and resumption, none of
which a throwaway fold needs; on a few hundred rows each fold takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import log
from stages.core.documents import Columns
from stages.core.metrics import classification_report, regression_report
from stages.core.schema import Params
from stages.core.splits import NAMES
from stages.tabular.data import Preprocessor, read_split


def whole_table(prepared: Path) -> pd.DataFrame:
    return pd.concat([read_split(prepared / f"{n}.parquet") for n in NAMES]).sort_index()


def fit_fold(train: pd.DataFrame, schema: Columns, arch: dict, params: Params, seed: int):
    """(preprocessor, trained model, target scaling) on one fold's training rows."""
    import torch

    from stages.tabular.budget import resolve
    from stages.tabular.model import build_model

    p = resolve(params.tabular.train, len(train))  # `auto` as train resolves it
    classify = schema.task == "classification"
    pre = Preprocessor.fit_features(train, schema.features)
    x = torch.from_numpy(pre.transform(train))
    if classify:
        y = torch.from_numpy(
            pd.Categorical(train[schema.target], categories=schema.classes).codes.astype(np.int64)
        )
        scale = None
    else:
        t = train[schema.target].to_numpy("float64")
        scale = {"mean": float(t.mean()), "std": float(t.std()) or 1.0}
        y = torch.from_numpy(((t - scale["mean"]) / scale["std"]).astype(np.float32))
    torch.manual_seed(seed)
    model = build_model({**arch, "n_in": pre.n_features})
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(p.epochs):
        for idx in torch.randperm(len(y), generator=gen).split(p.batch_size):
            out = model(x[idx])
            loss = loss_fn(out if classify else out[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return pre, model.eval(), scale


def cv_metrics(prepared: Path, schema: Columns, arch: dict, params: Params) -> dict | None:
    """{"folds": K, "rows": n, metric: {"mean", "sd"}} over K folds, or None above
    `cv_below` rows (or when it is 0)."""
    import torch
    from sklearn.model_selection import KFold, StratifiedKFold

    from stages.core.distributed import configure_backends

    e = params.tabular.evaluate
    rows = sum(schema.rows.values())
    if not e.cv_below or rows >= e.cv_below:
        return None
    configure_backends(torch.device("cpu"))  # threads as train sets them: the folds reproduce
    df = whole_table(prepared)
    classify = schema.task == "classification"
    y = df[schema.target].astype(str) if classify else None
    k = e.cv_folds
    folds = (
        StratifiedKFold(k, shuffle=True, random_state=params.seed).split(df, y)
        if classify and y.value_counts().min() >= k
        else KFold(k, shuffle=True, random_state=params.seed).split(df)
    )
    scores = []
    for i, (tr, te) in enumerate(folds):
        train, test = df.iloc[tr], df.iloc[te]
        pre, model, scale = fit_fold(train, schema, arch, params, params.seed + i)
        with torch.no_grad():
            # A value this fold never saw is read as serving reads it (screen: unknown).
            x = pre.transform(pre.screen(test)[0])
            out = model(torch.from_numpy(x)).numpy().astype("float64")
        if classify:
            probs = np.exp(out - out.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            codes = pd.Categorical(test[schema.target], categories=schema.classes).codes
            scores.append(classification_report(codes, probs, schema.classes)[0])
        else:
            pred = out[:, 0] * scale["std"] + scale["mean"]
            scores.append(regression_report(test[schema.target].to_numpy("float64"), pred)[0])
    table = pd.DataFrame(scores)
    result = {"folds": k, "rows": rows}
    for m in table.columns:
        result[m] = {"mean": float(table[m].mean()), "sd": float(table[m].std(ddof=1))}
    log(
        f"{k}-fold CV over {rows} rows: "
        + " ".join(
            f"{m}={v['mean']:.4f}±{v['sd']:.4f}" for m, v in result.items() if isinstance(v, dict)
        )
    )
    return result
