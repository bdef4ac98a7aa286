"""Explanations checked as the literature checks them: Shapley values against the `shap`
package's exact explainer, the sampled estimate additive and near the exact one, and on a
table made here where only two of eight columns carry the signal, those two lead the
permutation importance and hold the two largest attributions on nearly every row, served
(REST core) and batch (infer) alike. The served penguins' REST and v2 answers are checked
in tests/test_app.py and tests/test_serve_edge.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run, set_params

from stages.core.explain import permutation_importance, shapley
from stages.tabular.explain import blocks

RNG = np.random.default_rng(0)
W = RNG.normal(size=(6, 3))


def small_model(z: np.ndarray) -> np.ndarray:
    """A nonlinear 6-input, 3-class model with interactions: class probabilities."""
    logits = np.tanh(z) @ W + 0.5 * (z[:, :1] * z[:, 1:2])
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_exact_agrees_with_shap_exact_explainer():
    import shap

    bg = RNG.normal(size=(16, 6)).astype(np.float32)
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    base, phi = shapley(small_model, x, bg, [[j] for j in range(6)], np.array([2, 2, 2]))
    explainer = shap.explainers.Exact(lambda z: small_model(z)[:, 2], shap.maskers.Independent(bg))
    theirs = explainer(x)
    assert np.abs(theirs.values - phi).max() < 1e-6
    assert np.abs(theirs.base_values - base).max() < 1e-6
    assert np.abs(base + phi.sum(1) - small_model(x)[:, 2]).max() < 1e-9


def test_sampled_is_additive_and_near_exact_and_a_block_is_one_column():
    bg = RNG.normal(size=(16, 6)).astype(np.float32)
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    cols = [[0], [1, 2], [3], [4, 5]]  # a two-wide block is one column
    target = small_model(x).argmax(1)
    base, exact = shapley(small_model, x, bg, cols, target)
    sb, sampled = shapley(small_model, x, bg, cols, target, exact_columns=0, permutations=200)
    answer = small_model(x)[np.arange(4), target]
    assert exact.shape == (4, 4) and np.abs(base + exact.sum(1) - answer).max() < 1e-9
    assert np.abs(sb + sampled.sum(1) - answer).max() < 1e-9  # additive by construction
    assert np.abs(sampled - exact).max() < 0.01
    # Same answer for a row whatever else is in the call: permutations drawn once per call.
    _, alone = shapley(small_model, x[:1], bg, cols, target[:1], exact_columns=0)
    _, among = shapley(small_model, x, bg, cols, target, exact_columns=0)
    assert np.allclose(alone[0], among[0])


def test_permutation_importance_and_blocks():
    x = RNG.normal(size=(500, 4))
    y = x[:, 0] > 0
    full, drops = permutation_importance(
        lambda z: float(((z[:, 0] > 0) == y).mean()), x, [[0], [1], [2, 3]], 3, 0
    )
    assert full == 1 and drops[0].mean() > 0.3 and not drops[1:].any()
    pre = {
        "numeric": ["a", "b"],
        "dates": {"d": "%Y-%m-%d"},
        "texts": {"t": {"components": [[0.0]] * 3}},
        "categorical": ["c"],
        "categories": {"c": ["x", "y"]},
    }
    names, idx = blocks(pre)
    assert names == ["a", "b", "d", "t", "c"]
    assert [list(i) for i in idx] == [[0], [1], [2, 3, 4, 5, 6], [7, 8, 9], [10, 11]]


def signal_table(n: int = 600) -> pd.DataFrame:
    """Eight numbers; the class is decided by two of them (c1 and c5) alone."""
    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.normal(size=(n, 8)), columns=[f"c{i}" for i in range(8)]).round(4)
    df["label"] = np.where(df["c1"] + df["c5"] > 0, "yes", "no")
    return df


@pytest.mark.slow
def test_two_signal_columns_lead_importance_and_attributions(repo):
    signal_table().to_csv(repo / "data/tabular/signal.csv", index=False)
    set_params(
        repo,
        {
            "tabular.data.source": "data/tabular/signal.csv",
            "tabular.data.target": "label",
            "tabular.train.epochs": 30,
            "tabular.infer.explain": True,
            "tabular.export.exact_columns": 8,  # the served exact path; sampled below
            "tabular.evaluate.baseline": False,
        },
    )
    run(repo, "dvc", "repro", "export@tabular", "infer@tabular", timeout=900)
    importance = json.loads((repo / "metrics/tabular/importance.json").read_text())
    assert set(list(importance)[:2]) == {"c1", "c5"}, importance
    assert all(v["std"] >= 0 for v in importance.values())

    from app.predict import predict_tabular
    from app.repository import load_models
    from app.settings import load_settings

    m = load_models(repo / "models", load_settings(repo / "params.yaml"))[0]["tabular"]
    test = pd.read_parquet(repo / "data/prepared/tabular/test.parquet")
    rows = json.loads(test.drop(columns="label").to_json(orient="records"))
    preds = predict_tabular(m, rows, explain=True)
    sums = [p["base_value"] + sum(p["attributions"].values()) - p["probability"] for p in preds]
    assert max(map(abs, sums)) < 1e-6  # 8 columns: exact
    top2 = [
        set(sorted(p["attributions"], key=lambda c: -abs(p["attributions"][c]))[:2]) for p in preds
    ]
    assert np.mean([t == {"c1", "c5"} for t in top2]) >= 0.9
    # Sampled (exact_columns 0, 64 samples): still additive, and near the exact values.
    m.card.explain["exact_columns"] = 0
    sampled = predict_tabular(m, rows, explain=True)
    errors = []
    for p, q in zip(preds, sampled, strict=True):
        assert abs(q["base_value"] + sum(q["attributions"].values()) - q["probability"]) < 0.01
        errors += [q["attributions"][c] - p["attributions"][c] for c in p["attributions"]]
    assert np.sqrt(np.mean(np.square(errors))) < 0.03, np.abs(errors).max()
    # Batch infer wrote the same attributions (float32, six digits) as attr_<column> columns.
    written = pd.read_csv(repo / "data/predictions/tabular.csv").set_index("line")
    first = preds[0]["attributions"]
    line = test.index[0] if "line" not in test else test["line"].iloc[0]
    assert np.allclose(
        [written.loc[line, f"attr_{c}"] for c in first], list(first.values()), atol=1e-5
    )
