"""Trust (stages/core/trust.py) on synthetic scores, where the truth is known: conformal
coverage near 1 - alpha for a classifier and a regressor, temperature scaling lowering an
over-confident model's ECE, valid OOD p-values and far points flagged. The served models'
trust is in tests/test_trust_served.py."""

from __future__ import annotations

import numpy as np
from conftest import card_of

from stages.core import trust

ALPHA = 0.1


MEANS = np.random.default_rng(7).normal(0, 2, (4, 8))


def synthetic_classifier(n: int, rng: np.random.Generator, means: np.ndarray = MEANS):
    """Features around class means; the true class drawn from softmax(true logits), and the
    model's logits 3x over-confident."""
    classes = len(means)
    y_hidden = rng.integers(0, classes, n)
    feats = means[y_hidden] + rng.normal(0, 1, (n, 8))
    true_logits = -0.5 * ((feats[:, None, :] - means[None]) ** 2).sum(-1) / 4
    p = trust.softmax(true_logits)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return 3 * true_logits, feats, y


def fitted_classifier(rng, n_cal: int = 1000):
    tr_logits, tr_feats, tr_y = synthetic_classifier(2000, rng)
    val_logits, val_feats, val_y = synthetic_classifier(n_cal, rng)
    fit = trust.fit(ALPHA, 0.05, val_logits, val_y, val_feats, tr_feats, tr_y, True)
    return fit


def test_classification_sets_cover_at_one_minus_alpha_and_calibration_lowers_ece():
    rng = np.random.default_rng(0)
    fit = fitted_classifier(rng)
    assert 0.2 < 1 / fit["temperature"] < 0.6  # it undoes most of the 3x over-confidence
    logits, feats, y = synthetic_classifier(5000, rng)
    probs = trust.softmax(logits / fit["temperature"])
    m, plots = trust.metrics(fit, logits, probs, y, feats)
    assert 1 - ALPHA - 0.02 <= m["coverage"] <= 1 - ALPHA + 0.03
    assert m["ece"] < m["ece_uncalibrated"] and m["ece"] < 0.03
    assert 1 <= m["mean_set_size"] < 4
    # in-distribution OOD p-values are uniform: shares at or below t close to t
    assert abs(m["ood_p_le_0.1"] - 0.1) < 0.03 and abs(m["ood_p_le_0.5"] - 0.5) < 0.04
    assert plots["reliability"] and plots["reliability_uncalibrated"]


def test_far_points_are_flagged_with_the_smallest_p_value():
    rng = np.random.default_rng(1)
    fit = fitted_classifier(rng, n_cal=300)
    far = np.full((3, 8), 1e6)
    a = trust.apply(fit, trust.softmax(np.zeros((3, 4))), far)
    assert a["flagged"].all() and np.allclose(a["p_value"], 1 / 301)


def test_regression_intervals_cover_at_one_minus_alpha():
    rng = np.random.default_rng(2)

    def draw(n):
        x = rng.normal(0, 1, (n, 5))
        pred = x @ np.arange(1, 6)
        return pred, x, pred + rng.standard_t(4, n)  # heavy-tailed noise: no Gaussian luck

    _, tr_x, _ = draw(1000)
    val_pred, val_x, val_y = draw(1000)
    fit = trust.fit(ALPHA, 0.05, val_pred[:, None], val_y, val_x, tr_x, None, False)
    assert fit["temperature"] is None
    pred, x, y = draw(20000)
    m, plots = trust.metrics(fit, None, pred[:, None], y, x)
    assert abs(m["coverage"] - (1 - ALPHA)) < 0.02 and not plots
    assert m["mean_interval_width"] == 2 * fit["quantile"]
    rec = trust.records(fit, pred[:1, None], x[:1], None)[0]
    assert rec["interval"][0] < pred[0] < rec["interval"][1] and not rec["ood"]["flagged"]


def test_sets_always_hold_the_top_class_and_describe_reads_well():
    fit = {
        "quantile": 0.0,
        "temperature": 1.0,
        "ood": {
            "means": [[0.0]],
            "precision": [[1.0]],
            "calibration": [1.0, 2.0, 3.0],
            "threshold": 0.3,
        },
    }
    rec = trust.records(fit, np.array([[0.2, 0.5, 0.3]]), np.array([[10.0]]), ["A", "B", "C"])[0]
    assert rec == {"prediction_set": ["B"], "ood": {"flagged": True, "p_value": 0.25}}
    assert trust.describe(rec) == "(set: B) · unlike the training data (p = 0.25)"


def test_the_gate_refuses_coverage_below_one_minus_alpha_minus_0_05():
    from tools.registry import coverage_rows

    card = card_of(trust={"alpha": 0.1}, metrics={"test": {"coverage": 0.86}})
    assert coverage_rows(card)[0][-1] is True
    card.metrics["test"]["coverage"] = 0.84
    assert coverage_rows(card)[0][-1] is False
    assert coverage_rows(card_of(metrics={})) == []  # detect, or a card from before trust


def test_batch_infer_writes_interval_and_ood_columns(tmp_path):
    """The regression side of `infer`'s Writer, CSV and parquet, against the serving records."""
    import pandas as pd

    from stages.tabular.infer import Writer

    rng = np.random.default_rng(3)
    x_tr, x_val = rng.normal(0, 1, (200, 3)), rng.normal(0, 1, (100, 3))
    y_val = x_val.sum(1) + rng.normal(0, 0.5, 100)
    fit = trust.fit(ALPHA, 0.05, x_val.sum(1)[:, None], y_val, x_val, x_tr, None, False)
    card = card_of(kind="regression", classes=None, trust=fit)
    x = np.vstack([rng.normal(0, 1, (4, 3)), np.full((1, 3), 1e6)])
    values = x.sum(1)[:, None]
    expected = trust.records(fit, values, x, None)
    for suffix in (".csv", ".parquet"):
        w = Writer(tmp_path / f"out{suffix}", card)
        w.write(values, np.arange(2, 7), x)
        w.close()
        got = (pd.read_csv if suffix == ".csv" else pd.read_parquet)(tmp_path / f"out{suffix}")
        assert list(got.columns) == [
            "line",
            "prediction",
            "interval_low",
            "interval_high",
            "ood_flagged",
            "ood_p_value",
            "warnings",
        ]
        assert got["ood_flagged"].tolist() == [r["ood"]["flagged"] for r in expected]
        assert got["ood_flagged"].iloc[-1]  # the absurd row
        np.testing.assert_allclose(
            got[["interval_low", "interval_high"]], [r["interval"] for r in expected], rtol=1e-6
        )


def test_too_few_validation_rows_give_every_class_and_no_infinity_in_json():
    import json

    rng = np.random.default_rng(4)
    logits, feats, y = synthetic_classifier(5, rng)  # 5 rows < 1 / 0.1 - 1
    fit = trust.fit(ALPHA, 0.05, logits, y, feats, feats, y, True)
    assert fit["quantile"] is None and "Infinity" not in json.dumps(fit)
    assert trust.apply(fit, trust.softmax(logits), feats)["sets"].all()
    reg = trust.fit(ALPHA, 0.05, y[:, None] * 1.0, y * 1.0, feats, feats, None, False)
    rec = trust.records(reg, np.ones((1, 1)), feats[:1], None)[0]
    assert rec["interval"] == [None, None] and "(interval: -inf to inf)" in trust.describe(rec)


def test_temperature_softens_overconfident_logits_and_stays_1_without_mistakes():
    from stages.core.trust import fit_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), y] += 2.0
    flip = rng.random(400) < 0.2  # a fifth of the answers wrong, all of them very sure
    logits[flip] = np.roll(logits[flip], 1, axis=1)
    assert fit_temperature(logits * 5, y) > 1.5
    right = logits.argmax(axis=1) == y
    assert fit_temperature(logits[right] * 5, y[right]) == 1.0
