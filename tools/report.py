"""report: the pull-request report that CML posts (report.md + PNG plots in report/).

    python -m tools.report                 # against main
    python -m tools.report --base HEAD~1   # against any git revision

For every task: the params and metrics that changed against the base revision, the
validation summary, the model (ONNX file size, onnxruntime latency at batch 1) and the
key plots, drawn to PNG files that report.md links by relative path (no upload service).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from stages.core import layout
from stages.core.card import Card, read_card
from stages.core.cli import StageError, run_main
from stages.core.files import read_json
from stages.core.params import TASKS

HEADLINE = (
    "accuracy",
    "f1_macro",
    "roc_auc",
    "rmse",
    "mae",
    "r2",
    "mAP50",
    "mAP50-95",
    "precision",
    "recall",
    "train_seconds",  # tabular evaluate's cost block: the train stage beside HGB's fit
    "hgb_fit_seconds",
)


def dvc_json(*args: str) -> dict:
    res = subprocess.run(["dvc", *args, "--json"], capture_output=True, text=True)
    if res.returncode:
        raise StageError(f"dvc {' '.join(args)} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout or "{}")


def fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_rows(diff: dict, task: str) -> list[list]:
    """Headline metrics of a task (per-class detail left out), with old, new and change."""
    rows = []
    for path, metrics in sorted(diff.items()):
        if not path.startswith(f"metrics/{task}/"):
            continue
        for key, v in sorted(metrics.items()):
            if "per_class" in key or key.split(".")[-1] not in HEADLINE:
                continue
            change = v.get("diff")
            rows.append(
                [
                    f"{Path(path).relative_to(f'metrics/{task}').as_posix()}: {key}",
                    v.get("old"),
                    v.get("new"),
                    change,
                ]
            )
    return rows


def latency_ms(onnx: Path, card: Card, runs: int = 50) -> float:
    """Median onnxruntime latency at batch 1 on zeros of the model's input shape."""
    from stages.core.inference import open_session

    session = open_session(onnx)
    shape = [1 if isinstance(d, str) else d for d in card.onnx.input_shape]
    x = {session.get_inputs()[0].name: np.zeros(shape, np.float32)}
    session.run(None, x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def plot_curves(task: str, out: Path) -> list[tuple[str, str]]:
    """PNG plots for a task; returns (title, relative path) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    curves = sorted(Path(f"metrics/{task}/train/plots/metrics").glob("*.tsv"))
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        for f in curves:
            with open(f) as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            if not rows:
                continue
            ax = axes[0] if "loss" in f.stem else axes[1]
            ax.plot(
                [int(r["step"]) + 1 for r in rows], [float(r[f.stem]) for r in rows], label=f.stem
            )
        for ax, title in zip(axes, ("losses", "metrics"), strict=False):
            ax.set_xlabel("epoch"), ax.set_title(title), ax.legend(fontsize=7)
        made.append(("training curves", _save(fig, out / f"{task}_training.png")))
    confusion = Path(f"metrics/{task}/plots/confusion.json")
    if confusion.exists():
        pairs = read_json(confusion)
        labels = sorted({pair["actual"] for pair in pairs} | {pair["predicted"] for pair in pairs})
        m = np.zeros((len(labels), len(labels)), int)
        for pair in pairs:
            m[labels.index(pair["actual"]), labels.index(pair["predicted"])] += 1
        fig, ax = plt.subplots(figsize=(4, 3.6))
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for (i, j), n in np.ndenumerate(m):
            ax.text(j, i, n, ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted"), ax.set_ylabel("actual")
        made.append(("confusion matrix (test)", _save(fig, out / f"{task}_confusion.png")))
    pr = Path(f"metrics/{task}/plots/pr.json")
    if pr.exists():
        rows = read_json(pr)
        fig, ax = plt.subplots(figsize=(4, 3.2))
        ax.plot([r["recall"] for r in rows], [r["precision"] for r in rows])
        ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
        made.append(("precision-recall (test)", _save(fig, out / f"{task}_pr.png")))
    mistakes = Path(f"metrics/{task}/plots/mistakes.png")
    if mistakes.exists():
        shutil.copy2(mistakes, out / f"{task}_mistakes.png")
        made.append(("most confident mistakes", (out / f"{task}_mistakes.png").as_posix()))
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.as_posix()


def label_issues_md(task: str, top: int = 10) -> str:
    """The labels stage's summary and its worst rows (docs/validation.md); "" without one."""
    from stages.core.label_issues import read

    found = read(task)
    if found is None:
        return ""
    issues, s = found
    text = f"### Suspected label errors\n\n{s['count']} of {s['rows']} rows"
    if not s["rows"]:
        return f"{text}: skipped ({s.get('skipped')}).\n"
    text += f" ({s['share']:.1%}), `{layout.label_issues(task)}`; review, then exclude by params.\n"
    rows = issues.head(top).values.tolist()
    return text + ("\n" + table(list(issues.columns), rows) + "\n" if rows else "")


def importance_md(task: str, top: int = 10) -> str:
    """The columns that matter most on the test split (evaluate's permutation importance,
    docs/explain.md), or "" where the task has none."""
    path = layout.metrics_dir(task) / layout.IMPORTANCE.name
    if not path.exists():
        return ""
    rows = [[c, v["mean"], v["std"]] for c, v in list(read_json(path).items())[:top]]
    return (
        "### Column importance\n\nThe drop in the test split's headline score (accuracy, or "
        "R²) when a column is shuffled: mean and std over the shuffles.\n\n"
        + table(["column", "drop", "std"], rows)
        + "\n"
    )


def served_md(card: Card) -> str:
    """The served model's members (tabular: network and gradient boosting; the card's
    `ensemble`): weight, test scores alone, and why; "" for a model of one member."""
    ensemble = card.ensemble
    if not ensemble:
        return ""
    members = card.metrics.get("members", {})
    test = card.metrics.get("test", {})
    keys = [k for k in HEADLINE if k in test]
    rows = [
        [m, w, *(members.get(m, {}).get(k) for k in keys)] for m, w in ensemble["weights"].items()
    ]
    rows.append(["served", 1.0, *(test.get(k) for k in keys)])
    return (
        "\n**Served members** (test scores alone; weights fitted on the validation split)\n\n"
        + table(["member", "weight", *keys], rows)
        + f"\n\n{ensemble['why']}\n"
    )


def build_report(
    base: str, out_md: Path = Path("report.md"), plots_dir: Path = Path("report")
) -> str:
    shutil.rmtree(plots_dir, ignore_errors=True)
    plots_dir.mkdir(parents=True)
    params = dvc_json("params", "diff", base)
    metrics = dvc_json("metrics", "diff", base, "--all")
    parts = [
        f"# Model report\n\nAgainst `{base}`. Generated by `python -m tools.report --base {base}`.\n"
    ]
    changed = [
        [k, v.get("old"), v.get("new")] for f in params.values() for k, v in sorted(f.items())
    ]
    parts.append(
        "## Params changed\n\n"
        + (table(["param", base, "now"], changed) if changed else "None.")
        + "\n"
    )
    for task in TASKS:
        if not Path(f"metrics/{task}").exists():
            continue
        parts.append(f"## {task}\n")
        rows = metric_rows(metrics, task)
        parts.append(
            "### Metrics\n\n"
            + (table(["metric", base, "now", "change"], rows) if rows else "No metrics.")
            + "\n"
        )
        validation = layout.validation(task)
        if validation.exists():
            v = read_json(validation)
            failed = sum(not r["success"] for t in v["tables"].values() for r in t["results"])
            total = sum(len(t["results"]) for t in v["tables"].values())
            parts.append(
                f"### Validation\n\n{'passed' if v['success'] else '**failed**'}: {total - failed} of {total} "
                f"expectations met over {', '.join(v['tables'])} (`{v['suite_file']}`).\n"
            )
        parts.append(label_issues_md(task))
        parts.append(importance_md(task))
        onnx, card_path = layout.model_onnx(task), layout.card(task)
        if onnx.exists() and card_path.exists():
            card = read_card(card_path)
            parts.append(
                "### Model\n\n"
                + table(
                    [
                        "file",
                        "size (MB)",
                        "onnxruntime p50 latency, batch 1 (ms)",
                        f"{layout.MODEL_PT_FILE} md5",
                    ],
                    [
                        [
                            onnx.as_posix(),
                            round(onnx.stat().st_size / 1e6, 2),
                            round(latency_ms(onnx, card), 3),
                            card.provenance.get("model_md5", "")[:12],
                        ]
                    ],
                )
                + "\n"
                + served_md(card)
            )
        for title, path in plot_curves(task, plots_dir):
            parts.append(f"**{title}**\n\n![{task} {title}]({path})\n")
    text = "\n".join(parts)
    out_md.write_text(text)
    return text


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.report")
    ap.add_argument(
        "--base", default="main", help="git revision to compare against (default: main)"
    )
    ap.add_argument("--out", default="report.md")
    args = ap.parse_args(argv)
    if subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", args.base], capture_output=True
    ).returncode:
        raise StageError(f"--base {args.base}: no such git revision")
    build_report(args.base, Path(args.out))
    print(f"wrote {args.out} and report/")


if __name__ == "__main__":
    run_main(main)
