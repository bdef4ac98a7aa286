"""The `labels` bench section: the cost of the labels stage (K-fold out-of-fold
probabilities through cleanlab, stages/core/label_issues.py) against the train stage of the
same task on the demo data, both run as `python -m stages` processes in a scratch copy.
Issue 38's target: labels at most the train stage (issue 31's was 2x)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stages.core import layout
from tools.bench.repo import set_keys
from tools.bench.timing import Row

ROOT = Path(__file__).resolve().parents[2]
MAX_RATIO = 1.0


def stage_seconds(work: Path, stage: str, task: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "stages", stage, task],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise RuntimeError(f"{stage} {task} exited {res.returncode}: {res.stderr[-2000:]}")
    return time.perf_counter() - start


def workspace(scratch: Path, quick: bool) -> Path:
    """params.yaml (tiny when quick) and the source data, linked from the repository."""
    work = scratch / "repo"
    (work / "data").mkdir(parents=True)
    (work / "data/tabular").symlink_to(ROOT / "data/tabular")
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    if quick:
        tiny = {"image.demo.size": 16, "image.data.image_size": 16}
        for task in ("tabular", "image"):
            tiny |= {
                f"{task}.train.epochs": 1,
                f"{task}.labels.folds": 2,
                f"{task}.labels.epochs": 1,
            }
        set_keys(work / "params.yaml", tiny)
    return work


def labels(quick: bool, scratch: Path) -> dict:
    work = workspace(scratch, quick)
    # Quick (the test that keeps this code working): tabular only, to keep the suite short.
    tasks = ("tabular",) if quick else ("tabular", "image")
    if "image" in tasks:
        stage_seconds(work, "demo", "image")
    rows, details = [], {}
    for task in tasks:
        stage_seconds(work, "prepare", task)
        # Train first: it decodes the images into .cache/, which labels then reads as well.
        train = stage_seconds(work, "train", task)
        found = stage_seconds(work, "labels", task)
        summary = yaml.safe_load((work / layout.label_issue_counts(task)).read_text())
        details[task] = {"train_s": round(train, 2), "labels_s": round(found, 2), **summary}
        ratio = found / train
        rows.append(
            Row(
                f"{task}: labels stage vs train stage",
                ("labels", found, "s"),
                ("train", train, "s"),
                ratio,
                f"<= {MAX_RATIO:g}x",
                ratio <= MAX_RATIO,
                {"listed": summary["count"]},
            )
        )
    notes = [
        "wall time of each `python -m stages` process (imports included) on the demo data; "
        "labels = K folds x epochs of a cheaper model (tabular.labels, image.labels)"
    ]
    return {"rows": rows, "notes": notes, "details": details}
