"""What `make run` prints after DVC's own output: one line per task, then where the outputs are.

    python -m tools.summary

Per task with a metrics.json: the headline test metric beside its baseline (tabular: the
gradient-boosting baseline HGB; image: the majority-class share; detect: the floor
detect.evaluate.min_map50 below which evaluate fails), calibration (ECE, before → after
temperature scaling where that changed it) and the conformal coverage, the share of the test
split flagged out of distribution, the label issues found, and the train stage's wall time.
Every metric in full stays one command away (`dvc metrics show`), too wide to print here.
Reads the files layout.py names; torch-free. No line is over WIDTH characters.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from stages.core import layout
from stages.core.files import timing_path
from stages.core.params import TASKS, load_params

WIDTH = 100
COLUMNS = ("task", "test metric", "baseline", "ECE", "coverage", "OOD", "label issues", "train")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def headline(task: str, metrics: dict, floor: float) -> tuple[str, str]:
    """(the headline test metric, its baseline), each as `name value`."""
    test = metrics["test"]
    if task == "detect":
        return f"mAP50 {_num(test['mAP50'])}", f"floor {floor:.2f}"
    score = "accuracy" if "accuracy" in test else "r2"
    if task == "tabular":
        hgb = metrics.get("baseline_hgb")  # absent with tabular.evaluate.baseline off
        return f"{score} {_num(test[score])}", f"HGB {_num(hgb[score])}" if hgb else "-"
    support = [c["support"] for c in test.get("per_class", {}).values()]
    chance = max(support) / sum(support) if support and sum(support) else None
    return f"{score} {_num(test[score])}", f"majority {_num(chance)}"


def calibration(test: dict) -> str:
    if "ece" not in test:
        return "-"
    before, after = test.get("ece_uncalibrated", test["ece"]), test["ece"]
    if round(before, 3) == round(after, 3):
        return _num(after)
    return f"{_num(before)}→{_num(after)}"


def task_row(task: str, metrics: dict, floor: float) -> tuple[str, ...]:
    """One task's cells, in COLUMNS' order."""
    test = metrics["test"]
    score, baseline = headline(task, metrics, floor)
    issues = _read(layout.label_issue_counts(task))
    ood = test.get("ood_flagged_share")
    timing = _read(timing_path(f"stage-train-{task}"))
    return (
        task,
        score,
        baseline,
        calibration(test),
        _num(test.get("coverage")),
        "-" if ood is None else f"{ood:.1%}",
        "-" if issues is None else str(issues["count"]),
        duration(timing["seconds"] if timing else None),
    )


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart."""
    rows = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def outputs(params) -> list[str]:
    """Where the outputs are: the layout's paths, with <task> for the task's name."""
    t = "<task>"
    predictions = [str(params.tabular.infer.output), *map(str, layout.PREDICTIONS.values())]
    lines = {
        "models": f"{layout.model_onnx(t)}, card {layout.card(t)}",
        "metrics": f"{layout.metrics(t)}, plots {layout.plots(t)}/",
        "validation": f"{layout.validation(t)}, Data Docs {layout.datadocs(t)}/index.html",
        "label issues": str(layout.label_issues(t)),
        "predictions": ", ".join(predictions),
    }
    out = ["Outputs:"]
    for name, text in lines.items():
        out += textwrap.wrap(
            text, WIDTH, initial_indent=f"  {name:<13}", subsequent_indent=" " * 15
        )
    return out


def summary() -> list[str]:
    params = load_params()
    rows, warnings = [], []
    for task in TASKS:
        metrics = _read(layout.metrics(task))
        if metrics is None:
            continue
        rows.append(task_row(task, metrics, params.detect.evaluate.min_map50))
        warnings += [f"{task}: {w}" for w in metrics.get("warnings", [])]
    lines = [
        "On the test split (OOD: the share flagged out of distribution; train: wall time):",
        *table(rows),
    ]
    for w in warnings:
        lines += textwrap.wrap(w, WIDTH, initial_indent="  ! ", subsequent_indent="    ")
    return [
        *lines,
        "",
        *outputs(params),
        "",
        "Every metric: dvc metrics show; plots: dvc plots show; the models served: make serve",
    ]


def main() -> int:
    print("\n".join(["", *summary()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
