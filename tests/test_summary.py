"""tools/summary.py, what `make run` prints last, on the committed metrics/ (a real run's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from stages.core import layout
from tools.summary import WIDTH, summary


def test_summary_of_the_committed_run():
    """One line per task with its headline metric beside the baseline, calibration, coverage,
    OOD share and label issues; where the outputs are; nothing over WIDTH; no noise; no torch."""
    code = "import sys, tools.summary as s; s.main(); print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stderr == ""
    *lines, torch_loaded = done.stdout.splitlines()
    assert torch_loaded == "False"
    assert max(map(len, lines)) <= WIDTH
    rows = {
        line.split()[0]: line
        for line in lines
        if line.split()[:1] in (["tabular"], ["image"], ["detect"])
    }
    assert set(rows) == {"tabular", "image", "detect"}

    def metrics(task: str) -> dict:
        return json.loads((ROOT / layout.metrics(task)).read_text())

    tab, img, det = metrics("tabular"), metrics("image"), metrics("detect")
    assert f"accuracy {tab['test']['accuracy']:.3f}" in rows["tabular"]
    assert f"HGB {tab['baseline_hgb']['accuracy']:.3f}" in rows["tabular"]
    assert f"{tab['test']['ood_flagged_share']:.1%}" in rows["tabular"]
    support = [c["support"] for c in img["test"]["per_class"].values()]
    assert f"majority {max(support) / sum(support):.3f}" in rows["image"]
    assert f"{img['test']['coverage']:.3f}" in rows["image"]
    assert f"mAP50 {det['test']['mAP50']:.3f}" in rows["detect"]
    issues = json.loads((ROOT / layout.label_issue_counts("image")).read_text())["count"]
    assert rows["image"].split()[-2] == str(issues)
    text = "\n".join(lines)
    assert str(layout.model_onnx("<task>")) in text and "dvc metrics show" in text


def test_summary_train_time_and_missing_tasks(tmp_path: Path, monkeypatch):
    """The train stage's wall time from .cache/timings; a task without metrics has no line."""
    shutil.copy(ROOT / "params.yaml", tmp_path)
    shutil.copytree(ROOT / layout.metrics_dir("image"), tmp_path / layout.metrics_dir("image"))
    monkeypatch.chdir(tmp_path)
    timing = tmp_path / ".cache/timings/stage-train-image.json"
    timing.parent.mkdir(parents=True)
    timing.write_text(json.dumps({"seconds": 95.2}))
    lines = summary()
    assert [
        line.split()[0] for line in lines if line.startswith(("tabular", "image", "detect"))
    ] == ["image"]
    assert next(line for line in lines if line.startswith("image")).endswith("1m35s")
