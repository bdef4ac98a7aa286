"""Benchmark section 5b (opt-in, `--only large`): data bigger than memory through the whole chain."""

from __future__ import annotations

import sys
from pathlib import Path

from tools.bench.repo import (
    copy_repo,
    run_measured,
    set_keys,
    synthetic_csv,
)
from tools.bench.timing import Row


# ------------------------------------------------------------------ 5b. data bigger than memory
def large(quick: bool, scratch: Path) -> dict:
    """A 50,000,000-row CSV (about 2 GB) through prepare → validate → train (one epoch) →
    evaluate → export → infer (of the same CSV), each stage a process in a copy of the repo,
    with its time and peak memory. Not in the default sections (`--only large`): it takes tens of minutes on 2 cores."""
    n = 50_000 if quick else 50_000_000
    repo = copy_repo(scratch / "repo")
    csv = synthetic_csv(scratch / "big" / "penguins.csv", n)  # the name picks the committed suite
    size_mb = csv.stat().st_size / 2**20
    train = {"epochs": 1, "batch_size": 4096, "patience": 0, "nproc": 1}
    set_keys(
        repo / "params.yaml",
        {
            "tabular.data.source": str(csv),
            "tabular.infer.source": str(csv),  # infer: all 50M rows again
            # One epoch in large batches: the loop's speed is the training section's subject.
            **{f"tabular.train.{k}": v for k, v in train.items()},
            # HistGradientBoosting on 35M rows in memory: not this chain's subject
            "tabular.evaluate.baseline": False,
        },
    )
    rows, details = [], {"csv_rows": n, "csv_mib": round(size_mb), "stages": {}}
    for stage in ("prepare", "validate", "train", "boost", "evaluate", "export", "infer"):
        seconds, peak = run_measured([sys.executable, "-m", "stages", stage, "tabular"], repo)
        details["stages"][stage] = {
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak),
            "rows_per_s": round(n / seconds),
        }
        rows.append(
            Row(
                f"{stage}, {n:,}-row CSV ({size_mb:,.0f} MiB)",
                (stage, seconds, "s"),
                ("peak RSS", peak, "MiB"),
                peak / size_mb,
                extra={"rows_per_s": n / seconds},
            )
        )
    notes = [
        f"{stage}: {d['seconds']} s, peak {d['peak_rss_mib']} MiB ({d['peak_rss_mib'] / size_mb:.2f}x the CSV)"
        for stage, d in details["stages"].items()
    ]
    return {"rows": rows, "notes": notes, "details": details}
