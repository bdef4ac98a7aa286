"""Trust in a prediction, the same for every task: calibrated probabilities (temperature
scaling), split-conformal prediction sets (classification) and intervals (regression), and
an out-of-distribution p-value. Torch-free: numpy at serving time, scipy/scikit-learn only
to fit.

Fitted at evaluate and export time (the same deterministic fit, so the card's numbers are
the ones metrics.json scored) on the validation split, which the network never trained on:

- temperature T: minimises the validation NLL of softmax(logits / T); export divides the
  logits by T inside the ONNX graph, so every consumer of the graph gets calibrated
  probabilities and parity is checked on them;
- conformal quantile q: the ceil((n+1)(1-alpha))-th smallest validation score, where a
  score is 1 - p(true class) (LAC), or |y - prediction| (regression). A class is in the set
  when 1 - p <= q; the set always holds the top class (only ever larger: still valid).
  Intervals are prediction ± q. Coverage >= 1 - alpha, marginally, on exchangeable data;
- OOD: the smallest Mahalanobis distance of the network's penultimate features (the ONNX
  graph's second output) to a class mean of the training features (shared, shrunk
  covariance; one mean for regression). Its conformal p-value against the validation
  distances, (1 + #{val >= d}) / (n + 1), is uniform on in-distribution data, so a
  threshold t flags about a share t of it; the smallest p-value is 1 / (n + 1).

Hand-written rather than through mapie/crepes/netcal: the split-conformal case from
precomputed scores is one quantile, and serving needs that number itself in the model card
(those libraries keep it inside fitted Python objects and, for netcal, torch); the fit
below is a dozen lines of numpy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from stages.core.card import Card

ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (bounded search on log T); 1 when
    the validation split has no mistake to calibrate against."""
    from scipy.optimize import minimize_scalar

    logits = logits.astype("float64")
    rows = np.arange(len(y))
    if (logits.argmax(axis=1) == y).all():
        # Without a mistake the NLL only falls as T -> 0: a fit would sharpen every answer
        # (penguins: T 0.5 raised the test ECE from 0.0125 to 0.0142). Leave the network's.
        return 1.0

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y]))

    # T below 0.5 is only ever "best" when the validation split is classified without a
    # mistake (penguins): the NLL then falls as T -> 0, sharpening every answer to 1.0.
    res = minimize_scalar(nll, bounds=(math.log(0.5), math.log(20.0)), method="bounded")
    return float(math.exp(res.x)) if res.fun <= nll(0.0) else 1.0


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list]:
    """(expected calibration error of the top-class confidence, one row per non-empty bin:
    confidence, accuracy, count): equal-width bins over [0, 1]."""
    conf, right = probs.max(axis=1), (probs.argmax(axis=1) == y).astype("float64")
    which = np.minimum((conf * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            c, a = float(conf[m].mean()), float(right[m].mean())
            ece += m.mean() * abs(c - a)
            rows.append({"confidence": round(c, 6), "accuracy": round(a, 6), "count": int(m.sum())})
    return float(ece), rows


def conformal_quantile(nonconformity: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n+1)(1-alpha))-th smallest score (inf when
    the calibration set is too small for that level)."""
    n = len(nonconformity)
    k = math.ceil((n + 1) * (1 - alpha))
    return float(np.sort(nonconformity)[k - 1]) if k <= n else math.inf


def _pooled_gaussian(feats: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(class means, the shrunk precision of the pooled within-class covariance)."""
    from sklearn.covariance import LedoitWolf

    groups = np.zeros(len(feats), int) if labels is None else labels
    keys = np.unique(groups)
    means = np.stack([feats[groups == k].mean(axis=0) for k in keys])
    centred = feats - means[np.searchsorted(keys, groups)]
    return means, LedoitWolf(assume_centered=True).fit(centred).precision_


_ARRAYS: dict[int, tuple] = {}


def _arrays(ood: dict) -> tuple:
    """The card's OOD lists as arrays (precision, P m^T, m P m^T, sorted calibration),
    converted once per card: from JSON lists they cost a millisecond a request (128 x 128)."""
    hit = _ARRAYS.get(id(ood))
    if hit is None or hit[0] is not ood:
        means = np.asarray(ood["means"], "float64")
        prec = np.asarray(ood["precision"], "float64")
        pm = prec @ means.T
        cal = np.asarray(ood["calibration"], "float64")
        hit = _ARRAYS[id(ood)] = (ood, prec, pm, (means * pm.T).sum(1), cal)
    return hit[1:]


def ood_distance(feats: np.ndarray, ood: dict) -> np.ndarray:
    """The smallest Mahalanobis distance of each row of features to a class mean."""
    prec, pm, mpm, _ = _arrays(ood)
    f = feats.astype("float64")
    # (f - m) P (f - m) = fPf - 2 fPm + mPm, for all means at once
    d2 = ((f @ prec) * f).sum(1)[:, None] - 2 * f @ pm + mpm[None, :]
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def p_values(distances: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Conformal p-values: (1 + #{calibration distances >= d}) / (n + 1); calibration sorted."""
    n = len(calibration)
    above = n - np.searchsorted(calibration, distances, side="left")
    return (1 + above) / (n + 1)


def fit(
    alpha: float,
    threshold: float,
    val_out: np.ndarray,
    val_y: np.ndarray,
    val_feats: np.ndarray,
    train_feats: np.ndarray,
    train_y: np.ndarray | None,
    classify: bool,
    space: str = "features",
) -> dict:
    """The card's `trust` section from the validation outputs (classification: raw logits;
    regression: predictions in target units) and OOD vectors, and the training ones. space:
    what the OOD vectors are, "features" (the graph's penultimate output) or "input" (the
    model's input row, for tabular data); serving passes the same (ood_vectors)."""
    if classify:
        temperature = fit_temperature(val_out, val_y)
        probs = softmax(val_out.astype("float64") / temperature)
        nonconformity = 1 - probs[np.arange(len(val_y)), val_y]
    else:
        temperature = None
        nonconformity = np.abs(val_y - val_out.reshape(-1))
    means, prec = _pooled_gaussian(train_feats.astype("float64"), train_y if classify else None)
    fitted = {"means": means.tolist(), "precision": prec.tolist(), "calibration": []}
    ood = {**fitted, "calibration": np.sort(ood_distance(val_feats, fitted)).tolist()}
    return {
        "alpha": alpha,
        "temperature": temperature,
        "score": "1 - p(class) (LAC), top class always in" if classify else "|y - prediction|",
        # None: too few validation rows for this alpha (n < 1/alpha - 1); the set is then
        # every class, the interval unbounded. JSON has no infinity.
        "quantile": None if math.isinf(q := conformal_quantile(nonconformity, alpha)) else q,
        "calibration_rows": len(val_y),
        "ood": {
            **ood,
            "threshold": threshold,
            "space": space,
            "distance": "min Mahalanobis to class means",
        },
    }


def ood_vectors(card: Card, x: np.ndarray, outputs: list):
    """What the card's OOD score reads: the model input x or the graph's features output
    (None for a card without trust)."""
    if card.trust is None:
        return None
    return x if card.trust["ood"]["space"] == "input" else outputs[1]


def apply(trust: dict, predicted: np.ndarray, feats: np.ndarray) -> dict:
    """What serving and batch infer add to predictions, from the card's `trust` and the
    (calibrated) probabilities or values: `sets` (rows × classes, bool) or `intervals`
    (rows × 2), and the OOD `p_value` and `flagged` per row."""
    q = math.inf if trust["quantile"] is None else trust["quantile"]
    ood = trust["ood"]
    p = p_values(ood_distance(feats, ood), _arrays(ood)[3])
    out = {"p_value": p, "flagged": p <= ood["threshold"]}
    if trust["temperature"] is None:
        v = predicted[:, 0]
        out["intervals"] = np.stack([v - q, v + q], axis=1)
    else:
        sets = 1 - predicted <= q
        sets[np.arange(len(predicted)), predicted.argmax(axis=1)] = True
        out["sets"] = sets
    return out


def records(trust: dict, predicted: np.ndarray, feats: np.ndarray, classes: list | None) -> list:
    """apply() as one JSON-ready dict per row: prediction_set or interval, and ood."""
    a = apply(trust, predicted, feats)
    ood = [
        {"flagged": bool(f), "p_value": round(float(p), 6)}
        for f, p in zip(a["flagged"], a["p_value"], strict=True)
    ]
    if "sets" in a:
        sets = [[classes[j] for j in np.flatnonzero(row)] for row in a["sets"]]
        return [{"prediction_set": s, "ood": o} for s, o in zip(sets, ood, strict=True)]
    return [  # an unbounded end is null (JSON has no infinity)
        {"interval": [_finite(lo), _finite(hi)], "ood": o}
        for (lo, hi), o in zip(a["intervals"], ood, strict=True)
    ]


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def describe(record: dict) -> str:
    """The trust part of a prediction for a person: '(set: A, B) · looks like training data'."""
    if "prediction_set" in record:
        head = f"set: {', '.join(map(str, record['prediction_set']))}"
    else:
        lo, hi = (
            ("-inf", "inf")[i] if v is None else f"{v:.4g}"
            for i, v in enumerate(record["interval"])
        )
        head = f"interval: {lo} to {hi}"
    ood = record["ood"]
    tail = (
        f"unlike the training data (p = {ood['p_value']:.3g})"
        if ood["flagged"]
        else "looks like training data"
    )
    return f"({head}) · {tail}"


def metrics(
    trust: dict,
    raw_logits: np.ndarray | None,
    predicted: np.ndarray,
    y: np.ndarray,
    feats: np.ndarray,
) -> tuple[dict, dict]:
    """Test-split numbers for metrics.json, and the reliability plot rows (classification):
    ece_uncalibrated, ece, coverage, mean set size or interval width, the share flagged and
    the share of OOD p-values at or below 0.1 and 0.5 (valid p-values: about 0.1 and 0.5)."""
    a = apply(trust, predicted, feats)
    out, plots = {}, {}
    if "sets" in a:
        ece_raw, rows_raw = reliability(softmax(raw_logits.astype("float64")), y)
        ece, rows = reliability(predicted, y)
        out |= {"ece_uncalibrated": ece_raw, "ece": ece}
        out["coverage"] = float(a["sets"][np.arange(len(y)), y].mean())
        out["mean_set_size"] = float(a["sets"].sum(axis=1).mean())
        plots = {"reliability": rows, "reliability_uncalibrated": rows_raw}
    else:
        lo, hi = a["intervals"].T
        out["coverage"] = float(((y >= lo) & (y <= hi)).mean())
        out["mean_interval_width"] = float((hi - lo).mean())
    out["ood_flagged_share"] = float(a["flagged"].mean())
    out["ood_p_le_0.1"] = float((a["p_value"] <= 0.1).mean())
    out["ood_p_le_0.5"] = float((a["p_value"] <= 0.5).mean())
    return out, plots


def with_trust(card: Card, rows: list[dict], predicted: np.ndarray, feats) -> list[dict]:
    """Prediction dicts with the card's trust fields added (unchanged for a card without)."""
    if card.trust is None or feats is None:
        return rows
    extra = records(card.trust, predicted, feats, card.classes)
    return [{**r, **t} for r, t in zip(rows, extra, strict=True)]
