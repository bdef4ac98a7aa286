"""make tune (tools/tune.py): an Optuna study driving the DVC queue, trials pruned by the
training stage through `tune.trial` (stages/core/job.py), results read back from
`dvc exp show --json`, and a second run that continues the same study."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import run

pytestmark = pytest.mark.slow


def load_study(repo):
    import optuna

    return optuna.load_study(
        study_name="tiny-tune", storage=f"sqlite:///{repo}/.cache/tune/tiny-tune.db"
    )


def tune_results(repo) -> dict[int, dict]:
    """{trial number: the tune block of its experiment's metrics/tabular/train/metrics.json}."""
    found = {}
    for baseline in json.loads(run(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            metrics = (exp["revs"][0].get("data") or {}).get("metrics") or {}
            block = (
                metrics.get("metrics/tabular/train/metrics.json", {}).get("data", {}).get("tune")
            )
            if block:
                found[block["trial"]] = {**block, "name": exp["name"]}
    return found


def test_a_study_prunes_trials_and_reports_the_best(tuned_repo):
    repo, out = tuned_repo
    study = load_study(repo)
    states = Counter(t.state.name for t in study.trials)
    assert (
        len(study.trials) == 6
        and states["PRUNED"] >= 1
        and states["COMPLETE"] >= 2
        and not states["FAIL"]
    ), out
    assert "6/6 done, 0 running, 0 failed" in out
    # Trial 0 is the baseline: params.yaml's own values.
    assert (
        study.trials[0].params == {"tabular.train.lr": 0.01}
        and study.trials[0].user_attrs["baseline"]
    )
    results = tune_results(repo)
    for t in study.trials:
        block = results[t.number]
        assert block["name"] == t.user_attrs["experiment"] == f"tiny-tune-{t.number}"
        if t.state.name == "PRUNED":  # stopped early, and its experiment succeeded, saying so
            assert block["state"] == "pruned" and block["epochs_run"] < 4
        else:
            assert block["state"] == "complete" and block["epochs_run"] == 4
            assert t.value == block["best"]["val_acc"]
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert f"{best.value:.4g}" in out.split("best: trial", 1)[1].splitlines()[0]
    assert "Promote it: dvc exp apply tiny-tune-" in out and "make promote TASK=tabular" in out
    assert "importance: tabular.train.lr" in out
    for png in ("tiny-tune-history.png", "tiny-tune-importance.png"):
        assert (repo / "report/tune" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_continues_the_study(tuned_repo):
    repo, _ = tuned_repo
    before = len(load_study(repo).trials)
    out = run(
        repo, "python", "-m", "tools.tune", "sweeps/tiny-tune.yaml", "--trials", "1", timeout=600
    ).stdout
    study = load_study(repo)
    assert len(study.trials) == before + 1, out
    assert study.trials[-1].state.name in ("COMPLETE", "PRUNED") and f"tiny-tune-{before}" in out
    assert not study.trials[-1].user_attrs.get(
        "baseline"
    )  # the baseline is enqueued once, in a new study
