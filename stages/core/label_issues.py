"""Label issues, the same for every classification task: K-fold out-of-fold probabilities
over every row (train, val and test, so a wrong label in the test split is found too),
passed to cleanlab's confident learning (`cleanlab.filter.find_label_issues`, its own
filter and ranking, not a fixed top share). A task supplies only `fit_predict(train, held)`:
fit a model on the rows `train` and return its class probabilities for the rows `held`.

Outputs, per task: metrics/<task>/label_issues.csv (line, given, suggested, score; worst
first; `line` is the CSV's file line for tabular, the image's path for image) and
metrics/<task>/label_issues.json (count, share, rows, folds). Nothing is dropped: a person
reviews the list and excludes lines by params (docs/validation.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import layout
from stages.core.cli import StageError, log
from stages.core.files import atomic_path, write_json

COLUMNS = ["line", "given", "suggested", "score"]
# Fold models are short runs, not tuned per data set: a light, fixed weight decay for all.
FOLD_WEIGHT_DECAY = 1e-4
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]


def out_of_fold(labels: np.ndarray, n_classes: int, folds: int, seed: int, fit_predict: FitPredict):
    """(N × n_classes) probabilities, each row predicted by the fold model that did not see it.
    Folds are stratified on the given labels; a class with fewer rows than folds is still
    split as far as it goes (scikit-learn warns, and every row is still held out once)."""
    import warnings

    import torch
    from sklearn.model_selection import StratifiedKFold

    from stages.core.distributed import configure_backends

    # The thread count changes a CPU network's sums in the last bits, and so the list: set it
    # as the trainer does, not from the environment (a parent's OMP_NUM_THREADS, e.g. one
    # that Ultralytics set, once made a rerun differ).
    configure_backends(torch.device("cpu"))
    if folds < 2:
        raise StageError(f"labels.folds is {folds}; out-of-fold probabilities need at least 2")
    if len(labels) < folds:
        raise StageError(f"{len(labels)} rows are fewer than labels.folds ({folds})")
    probs = np.zeros((len(labels), n_classes), np.float64)
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        parts = list(kfold.split(np.zeros(len(labels)), labels))
    for k, (train, held) in enumerate(parts):
        start = time.perf_counter()
        probs[held] = fit_predict(train, held)
        acc = float((probs[held].argmax(1) == labels[held]).mean())
        took = time.perf_counter() - start
        log(
            f"labels: fold {k + 1}/{folds}: {len(held)} rows held out, "
            f"agreement with the given labels {acc:.3f} ({took:.1f} s)"
        )
    return probs


def find(keys: list, labels: np.ndarray, probs: np.ndarray, classes: list) -> pd.DataFrame:
    """The suspected label errors, worst first: cleanlab's filter (prune_by_noise_rate, its
    default) picks them, its self-confidence score (the out-of-fold probability of the given
    label; low = suspect) ranks them."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # cleanlab wants every class present among the given labels' columns; rows sum to 1.
    probs = probs / probs.sum(1, keepdims=True)
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    score = get_label_quality_scores(labels, probs, method="self_confidence")
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame(
        {
            "line": np.asarray(keys, dtype=object)[ranked],
            "given": names[labels[ranked]],
            "suggested": names[probs[ranked].argmax(1)],
            "score": np.round(score[ranked], 6),
        },
        columns=COLUMNS,
    )


def write(issues: pd.DataFrame, rows: int, extra: dict, out: Path) -> dict:
    """The list (CSV, `out`) and its summary (JSON beside it, a DVC metrics file)."""
    with atomic_path(out) as tmp:
        issues.to_csv(tmp, index=False)
    summary = {
        "count": len(issues),
        "share": round(len(issues) / rows, 6) if rows else 0.0,
        "rows": rows,
        **extra,
    }
    write_json(out.with_name(layout.LABEL_ISSUE_COUNTS_FILE), summary)
    return summary


def skip(task: str, why: str, out: Path) -> dict:
    """An empty list (so the stage's outputs exist) and one log line saying why."""
    log(f"labels: skipped for {task}: {why}")
    return write(pd.DataFrame(columns=COLUMNS), 0, {"skipped": why}, out)


def report(out: Path, issues: pd.DataFrame, summary: dict) -> None:
    log(
        f"labels: {summary['count']} suspected label errors in {summary['rows']} rows "
        f"({summary['share']:.1%}) → {out}"
    )
    for row in issues.head(5).itertuples(index=False):
        log(
            f"  {row.line}: given {row.given!r}, suggested {row.suggested!r} (score {row.score:.3f})"
        )


def fit_network(model, x, y, epochs: int, batch_size: int, lr: float, seed: int, augment=None):
    """A fold's model, trained for a fixed number of epochs with AdamW and a cosine decay.
    Hand-written rather than the shared trainer (stages/core/job.py): a fold needs none of its
    checkpoints, DVCLive, early stopping on a validation split or DDP, and K of them run in
    one process. `augment(x)`, when given, transforms each batch (images)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=FOLD_WEIGHT_DECAY)
    steps = epochs * -(-len(y) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            xb = x[idx] if augment is None else augment(x[idx])
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def predict_proba(model, x, batch_size: int = 4096) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [torch.softmax(model(xb).float(), 1).numpy() for xb in x.split(batch_size)]
        ).astype(np.float64)


def read(task: str, metrics_dir: str | Path = "metrics") -> tuple[pd.DataFrame, dict] | None:
    """The stage's list and summary, for the report and the app (torch-free); None before
    the stage has run."""
    folder = Path(metrics_dir) / task
    if (
        not (folder / layout.LABEL_ISSUES_FILE).is_file()
        or not (folder / layout.LABEL_ISSUE_COUNTS_FILE).is_file()
    ):
        return None
    from stages.core.files import read_json

    return pd.read_csv(folder / layout.LABEL_ISSUES_FILE), read_json(
        folder / layout.LABEL_ISSUE_COUNTS_FILE
    )
