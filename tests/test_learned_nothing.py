"""evaluate's metrics (stages/core/metrics.py): it says when a model learned nothing, at or
below chance (the majority-class share, r2 0) or, for detection, below a mAP50 floor
(tests/test_detect_long.py runs that one); its plot files stay bounded on large test splits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import TINY_TABULAR, copy_repo, params_with, set_params, stage

from stages.core.cli import StageError
from stages.core.inference import softmax
from stages.core.metrics import (
    CURVE_POINTS,
    PLOT_ROWS,
    classification_report,
    fail_if_untrained,
    learned_nothing,
    regression_report,
)


def test_learned_nothing_at_or_below_the_floor(capsys):
    assert learned_nothing("image", "accuracy", 0.31, 0.3, "the majority-class share") == []
    [text] = learned_nothing("image", "accuracy", 0.3, 0.3, "the majority-class share")
    assert text.startswith(
        "the image model learned nothing: test accuracy 0.3 is not above the majority-class share"
    )
    assert "image.train.pretrained" in text and "image.train.epochs" in text
    assert f"warning: {text}" in capsys.readouterr().err
    fail_if_untrained(
        [], "image", params_with({"image.evaluate.fail_if_untrained": True})
    )  # nothing to fail on
    fail_if_untrained([text], "image", params_with({"image.evaluate.fail_if_untrained": False}))
    with pytest.raises(
        StageError, match=r"learned nothing.*\(image\.evaluate\.fail_if_untrained is true\)$"
    ):
        fail_if_untrained([text], "image", params_with({"image.evaluate.fail_if_untrained": True}))


@pytest.mark.slow
def test_tabular_evaluate_warns_then_fails_on_an_untrained_model(tmp_path):
    """An MLP that never moved (lr ~0, one epoch) scores at the majority-class share or below:
    a warning in the log and in metrics.json; fail_if_untrained fails the stage, after
    writing metrics.json."""
    repo = copy_repo(tmp_path / "repo")
    set_params(
        repo,
        {
            **TINY_TABULAR,
            "tabular.train.lr": 1e-12,
            "tabular.train.epochs": 1,
            "tabular.evaluate.baseline": False,
            "tabular.boost.models": "network",  # the network alone is served: it learned nothing
        },
    )
    for name in ("prepare", "train", "boost"):
        stage(repo, name, "tabular")
    res = stage(repo, "evaluate", "tabular")
    assert re.search(
        r"^warning: the tabular model learned nothing: test accuracy", res.stderr, re.M
    ), res.stderr
    metrics = json.loads((repo / "metrics/tabular/metrics.json").read_text())
    assert len(metrics["warnings"]) == 1 and "majority-class share" in metrics["warnings"][0]
    set_params(repo, {"tabular.evaluate.fail_if_untrained": True})
    (repo / "metrics/tabular/metrics.json").unlink()
    res = stage(repo, "evaluate", "tabular", check=False)
    assert res.returncode == 1 and re.search(
        r"^error: the tabular model learned nothing: .*is true\)$", res.stderr, re.M
    )
    assert json.loads((repo / "metrics/tabular/metrics.json").read_text())["warnings"]


def test_plot_files_stay_bounded_and_metrics_use_every_row():
    """Beyond PLOT_ROWS test rows the confusion rows are every k-th row (same shares) and the
    curves keep CURVE_POINTS evenly spaced points; accuracy and AUC count every row."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 3 * PLOT_ROWS + 1
    y = rng.integers(0, 3, n)
    probs = softmax(rng.normal(size=(n, 3)) + 2 * np.eye(3)[y])
    metrics, plots = classification_report(y, probs, ["a", "b", "c"])
    assert metrics["accuracy"] == (probs.argmax(1) == y).mean()
    assert metrics["roc_auc"] == roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert len(plots["confusion"]) == len(range(0, n, 4)) <= PLOT_ROWS
    assert [r["actual"] for r in plots["confusion"][:3]] == [
        ["a", "b", "c"][c] for c in y[[0, 4, 8]]
    ]
    assert len(plots["roc"]) == len(plots["pr"]) == CURVE_POINTS
    assert plots["roc"][0] == {"fpr": 0.0, "tpr": 0.0} and plots["roc"][-1] == {
        "fpr": 1.0,
        "tpr": 1.0,
    }
    small, small_plots = classification_report(y[:50], probs[:50], ["a", "b", "c"])
    assert len(small_plots["confusion"]) == 50  # small test splits: every row, every point
    _, reg = regression_report(y.astype(float), probs[:, 0])
    assert len(reg["predicted"]) == len(range(0, n, 4))
