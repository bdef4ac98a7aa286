"""The second model family and how it joins the network, torch-free and pure: gradient
boosting (scikit-learn's HistGradientBoosting) on the network's own preprocessed features,
early-stopped on the validation split; Caruana-style greedy ensemble selection (Caruana et
al., "Ensemble selection from libraries of models", 2004) of the members' validation
predictions; and the served output the members make together.

Both members speak the network's output space, so the served graph and everything that reads
it (calibration, conformal sets, OOD, infer, app/) are unchanged: a classifier's output is
the log of the weighted mean of the members' probabilities (softmax gives that mean back, and
dividing by a temperature calibrates it as it did logits); a regressor's is the weighted mean
of the members' standardised predictions (boosting is fitted on the standardised target).
"""

from __future__ import annotations

import numpy as np

from stages.core.inference import softmax

MEMBERS = ("network", "boosting")
EPS = 1e-12  # probabilities are clipped here before the log: an exact 0 would give -inf
MIN_VAL_ROWS = 20  # fewer validation rows cannot judge early stopping or weights


def fit_boosting(x, y, x_val, y_val, classify: bool, p, seed: int):
    """HistGradientBoosting on the training split's features, stopped on the validation
    split (X_val, y_val: scikit-learn >= 1.6) when `val_usable` says it can judge, else run
    to max_iter with no early stopping."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    stop = x_val is not None
    model = (HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor)(
        learning_rate=p.learning_rate,
        max_iter=p.max_iter,
        max_leaf_nodes=p.max_leaf_nodes,
        early_stopping=stop,
        n_iter_no_change=p.patience,
        random_state=seed,
    )
    return float32_thresholds(model.fit(x, y, **({"X_val": x_val, "y_val": y_val} if stop else {})))


def float32_thresholds(model):
    """Each split's threshold t (float64) replaced by the largest float32 <= t, in place.

    The model only ever sees float32 features (the network's input), and for a float32 x,
    x <= t exactly when x <= that float32: scikit-learn's answers do not change. ONNX's
    TreeEnsemble holds float32 thresholds; skl2onnx rounds HistGradientBoosting's to the
    nearest (it adjusts only DecisionTree's, skl2onnx.common.tree_ensemble.sklearn_threshold),
    so an x between t and a rounded-up threshold took the other branch: onnxruntime and
    scikit-learn differed by 0.01 to 0.03 on real tables (tools/realtables.py housing, flights)."""
    for trees in model._predictors:  # one list per iteration, one tree per class (or one)
        for tree in trees:
            t = tree.nodes["num_threshold"]
            t32 = t.astype(np.float32)
            above = t32.astype(np.float64) > t
            t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
            tree.nodes["num_threshold"] = t32
    return model


def val_problem(y_val: np.ndarray, classify: bool) -> str | None:
    """Why the validation split cannot judge early stopping or weights, or None."""
    if len(y_val) < MIN_VAL_ROWS:
        return f"{len(y_val)} validation rows (fewer than {MIN_VAL_ROWS})"
    if classify and len(np.unique(y_val)) < 2:
        return "the validation split holds a single class"
    if not classify and np.ptp(y_val) == 0:
        return "the target is constant on the validation split"
    return None


def member_outputs(network_raw: np.ndarray, boosting_pred: np.ndarray | None, classify: bool):
    """{member: its predictions in the space the weights mix}: probabilities for a
    classifier, standardised values (n,) for a regressor."""
    net = softmax(network_raw.astype("float64")) if classify else network_raw[:, 0]
    out = {"network": net}
    if boosting_pred is not None:
        out["boosting"] = np.asarray(boosting_pred, dtype="float64")
    return out


def loss(pred: np.ndarray, y: np.ndarray, classify: bool) -> float:
    """What selection minimises: log loss (classification) or mean squared error."""
    if classify:
        return float(-np.log(np.clip(pred[np.arange(len(y)), y], EPS, 1)).mean())
    return float(((pred - y) ** 2).mean())


def select(preds: dict[str, np.ndarray], y: np.ndarray, classify: bool, rounds: int) -> dict:
    """Greedy ensemble selection with replacement: start from the best member, then `rounds`
    times add the member (again, maybe) whose addition lowers the validation loss of the
    running mean most. Weights = each member's share of the picks. Ties go to the earlier
    member in MEMBERS (the network), so a member is added only when it helps."""
    names = [m for m in MEMBERS if m in preds]
    single = {m: loss(preds[m], y, classify) for m in names}
    first = min(names, key=single.__getitem__)
    counts, total = dict.fromkeys(names, 0), np.zeros_like(preds[first])
    counts[first], total = 1, total + preds[first]
    for k in range(2, rounds + 1):
        best = min(names, key=lambda m: loss((total + preds[m]) / k, y, classify))
        counts[best] += 1
        total = total + preds[best]
    weights = {m: counts[m] / rounds for m in names}
    return {
        "weights": weights,
        "val_loss": single,
        "val_loss_ensemble": loss(total / rounds, y, classify),
    }


def chosen(models: str, preds: dict, y: np.ndarray | None, classify: bool, rounds: int, problem):
    """The `ensemble` section of the card: members, weights, validation losses and why.
    `models`: tabular.boost.models; `problem`: val_problem's reason, which falls back to the
    network alone (an ensemble needs a validation split that can judge it)."""
    metric = "log loss" if classify else "mean squared error (standardised target)"
    if models == "ensemble" and problem is None and "boosting" in preds:
        picked = select(preds, y, classify, rounds)
        losses = ", ".join(f"{m} {v:.4f}" for m, v in picked["val_loss"].items())
        why = (
            f"greedy ensemble selection ({rounds} rounds, with replacement) on the validation "
            f"split's {metric}: alone {losses}; together {picked['val_loss_ensemble']:.4f}"
        )
        return {"models": models, **picked, "why": why}
    alone = "boosting" if models == "boosting" and "boosting" in preds else "network"
    why = f"tabular.boost.models: {models}"
    if models == "ensemble":
        why = f"the network alone: {problem or 'no boosting model'}, so no weights were fitted"
    return {"models": models, "weights": {m: float(m == alone) for m in preds}, "why": why}


def combine(preds: dict[str, np.ndarray], weights: dict[str, float], classify: bool) -> np.ndarray:
    """The served raw output (before any temperature) from member_outputs: (n, classes) log
    probabilities or (n, 1) standardised values. (For the network alone that is its
    log-softmax, whose softmax, and temperature-scaled softmax, are the network's own.)"""
    used = {m: w for m, w in weights.items() if w > 0}
    mean = sum(w * preds[m] for m, w in used.items())
    if classify:
        return np.log(np.maximum(mean, EPS))
    return mean.reshape(-1, 1)
