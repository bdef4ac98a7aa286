"""A drift report from the server's sampled request log against the training data.

    python -m tools.drift                       # every task with a log → report/drift/<task>.html, .png, .json
    python -m tools.drift --task tabular --logs .cache/requests --out report/drift

Per feature: PSI of the logged values against the bins and shares that export stored in
the model card's `reference` (the training split), the same measure as the server's
`input_drift_psi` gauges, and for numbers the Kolmogorov-Smirnov statistic against the
training split itself where it is on disk (tabular). Evidently would draw a richer page,
but its current release (0.7) does not import with pandas 3, which this project uses.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from app.monitor import feature_shares, psi
from stages.core import layout
from stages.core.card import Card, read_card
from stages.core.params import TASKS, load_params

WATCH = 0.1  # PSI above this (and below serve.drift_threshold): watch the feature


def read_log(folder: Path, task: str) -> list[dict]:
    """The logged rows of one task, from every worker's file and its rotated copies."""
    rows = []
    for f in sorted(folder.glob(f"{task}-*.jsonl*")):
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line)["values"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a killed worker
    return rows


def training_values(card: Card) -> pd.DataFrame | None:
    """The training split, where it is on disk (tabular), for KS."""
    path = Path("data/prepared/tabular/train.parquet")
    return pd.read_parquet(path) if card.task == "tabular" and path.is_file() else None


def compare(card: Card, rows: list[dict], shifted: float) -> list[dict]:
    """Per feature: PSI (above `shifted`, serve.drift_threshold: the feature has moved), KS."""
    from scipy.stats import ks_2samp

    train = training_values(card)
    out = []
    for name, ref in card.reference["features"].items():
        values = [
            x
            for r in rows
            if name in r
            for x in (r[name] if isinstance(r[name], list) else [r[name]])
        ]
        expected, actual = feature_shares(ref, values)
        present = [
            v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))
        ]
        row = {
            "feature": name,
            "type": ref["type"],
            "served": len(present),
            "psi": round(psi(expected, actual), 4) if present and len(expected) > 1 else None,
            "ks": None,
            "expected": expected.tolist(),
            "actual": actual.tolist(),
        }
        if train is not None and ref["type"] == "numeric" and name in train and present:
            row["ks"] = round(float(ks_2samp(train[name].dropna(), present).statistic), 4)
        row["verdict"] = (
            "-"
            if row["psi"] is None
            else "shifted"
            if row["psi"] > shifted
            else "watch"
            if row["psi"] > WATCH
            else "stable"
        )
        out.append(row)
    return out


def draw(task: str, card: Card, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(3, n)
    fig, axes = plt.subplots(
        -(-n // cols), cols, figsize=(4 * cols, 2.6 * -(-n // cols)), squeeze=False
    )
    for ax, r in zip(axes.flat, results, strict=False):
        ref = card.reference["features"][r["feature"]]
        ticks = (
            ["< " + f"{ref['bins'][0]:g}"] + [f"{b:g}" for b in ref["bins"]]
            if ref["type"] == "numeric"
            else [*ref["shares"], "other"]
        )
        x = np.arange(len(r["expected"]))
        ax.bar(x - 0.2, r["expected"], 0.4, label="training")
        ax.bar(x + 0.2, r["actual"], 0.4, label="served")
        ax.set_xticks(x, ticks[: len(x)], rotation=60, fontsize=6)
        ax.set_title(f"{r['feature']}: PSI {r['psi']} ({r['verdict']})", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{task}: served inputs against the training data", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(task: str, card: Card, rows: list[dict], out: Path, shifted: float) -> dict:
    results = compare(card, rows, shifted)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{task}.png"
    draw(task, card, results, png)
    table = "".join(
        f"<tr><td>{html.escape(r['feature'])}</td><td>{r['served']}</td><td>{r['psi']}</td>"
        f"<td>{r['ks'] if r['ks'] is not None else '-'}</td><td>{r['verdict']}</td></tr>"
        for r in results
    )
    image = base64.b64encode(png.read_bytes()).decode()
    (out / f"{task}.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>drift: {task}</title><h1>{task}: served inputs against the "
        f"training data</h1><p>{len(rows)} logged requests; reference: {html.escape(card.reference['source'])}. "
        f"PSI &gt; {shifted}: shifted, &gt; {WATCH}: watch. KS: against the training split.</p>"
        f"<table border=1 cellpadding=4><tr><th>feature</th><th>served values</th><th>PSI</th><th>KS</th>"
        f"<th>verdict</th></tr>{table}</table><p><img src='data:image/png;base64,{image}'></p>"
    )
    summary = {
        "task": task,
        "requests": len(rows),
        "features": {
            r["feature"]: {k: r[k] for k in ("served", "psi", "ks", "verdict")} for r in results
        },
    }
    (out / f"{task}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.drift")
    ap.add_argument("--task", choices=TASKS, action="append", help="default: every task with a log")
    ap.add_argument("--logs", default=".cache/requests", help="serve.request_log_dir")
    ap.add_argument("--models", default="models")
    ap.add_argument("--out", default="report/drift")
    args = ap.parse_args(argv)
    shifted = load_params().serve.drift_threshold
    done = 0
    for task in args.task or TASKS:
        rows = read_log(Path(args.logs), task)
        card_path = Path(args.models) / task / layout.CARD_FILE
        if not rows or not card_path.is_file():
            continue
        card = read_card(card_path)
        if card.reference is None:
            raise SystemExit(
                f"error: {card_path} has no reference statistics: export it again (dvc repro export@{task})"
            )
        summary = report(task, card, rows, Path(args.out), shifted)
        moved = [f for f, r in summary["features"].items() if r["verdict"] == "shifted"]
        print(
            f"{task}: {len(rows)} requests, shifted: {', '.join(moved) or 'none'} → {args.out}/{task}.html"
        )
        done += 1
    if not done:
        raise SystemExit(
            f"error: no request log with a model card under {args.logs} (serve.request_log_sample > 0?)"
        )


if __name__ == "__main__":
    main()
