"""The `numerics` bench section: what the numeric baseline costs (stages/core/numerics.py,
params.yaml `reproducible`). The train stage of each classification task on the demo data,
pinned (AVX2 kernels, 2 threads, fp32) against unpinned (this CPU's widest kernels, its
physical cores, bf16 autocast where native), as `python -m stages train` processes in a
scratch copy, alternating so that a colleague's load falls on both. Issue 38's target: at
most 15% slower."""

from __future__ import annotations

import shutil
from pathlib import Path

from tools.bench.labels import stage_seconds, workspace
from tools.bench.repo import set_keys
from tools.bench.timing import Row

MAX_RATIO = 1.15


def train_seconds(work: Path, task: str, reproducible: bool) -> float:
    set_keys(work / "params.yaml", {"reproducible": reproducible})
    shutil.rmtree(work / f"models/{task}/checkpoints", ignore_errors=True)  # never a resume
    return stage_seconds(work, "train", task)


def numerics(quick: bool, scratch: Path) -> dict:
    work = workspace(scratch, quick)
    tasks = ("tabular",) if quick else ("tabular", "image")
    if "image" in tasks:
        stage_seconds(work, "demo", "image")
    rows, details = [], {}
    for task in tasks:
        stage_seconds(work, "prepare", task)
        stage_seconds(work, "train", task)  # warm: decoded images, imported modules on disk
        runs = {True: [], False: []}
        for _ in range(1 if quick else 2):
            for pinned in (True, False):
                runs[pinned].append(train_seconds(work, task, pinned))
        pinned, free = min(runs[True]), min(runs[False])
        details[task] = {"pinned_s": runs[True], "unpinned_s": runs[False]}
        ratio = pinned / free
        rows.append(
            Row(
                f"{task}: train pinned vs unpinned",
                ("pinned", pinned, "s"),
                ("unpinned", free, "s"),
                ratio,
                f"<= {MAX_RATIO:g}x",
                ratio <= MAX_RATIO,
            )
        )
    notes = [
        "wall time of `python -m stages train TASK` (imports included), the best of the "
        "alternating runs; pinned = reproducible: true (the default)"
    ]
    return {"rows": rows, "notes": notes, "details": details}
