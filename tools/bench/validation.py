"""Benchmark section 5: the GX suite on a large table; prepare and validate on a very large CSV."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tools.bench.repo import (
    copy_repo,
    run_measured,
    set_keys,
    synthetic_csv,
)
from tools.bench.timing import Row, alternate, median, ratio_row

# ------------------------------------------------------------------ 5. validation and ingestion


def validation(quick: bool, scratch: Path) -> dict:
    """The tabular GX suite on a large table (with and without Data Docs); prepare and
    validate as processes on a very large CSV, with their peak memory."""
    from stages.core.expectations import load_suite, run_suite

    n = 20_000 if quick else 1_000_000
    train = pd.read_parquet("data/prepared/tabular/train.parquet")
    big = train.iloc[np.random.default_rng(0).integers(0, len(train), n)].reset_index(drop=True)
    big.index = pd.RangeIndex(2, 2 + n, name="line")
    suite = load_suite("data/expectations/tabular/penguins.json")
    docs = itertools.count()
    run_suite(
        suite, {"train": big.head(100)}, scratch / "docs"
    )  # warm-up: GX's imports and first-use costs
    times = alternate(
        {
            "run_suite": lambda: run_suite(suite, {"train": big}),
            "with Data Docs": lambda: run_suite(
                suite, {"train": big}, scratch / f"docs{next(docs)}"
            ),
        },
        1 if quick else 3,
        warmup=0,
    )
    rate = {k: n / median(v) for k, v in times.items()}
    rows = [
        ratio_row(
            f"GX tabular suite, {n:,} rows",
            ("run_suite", rate["run_suite"], "rows/s"),
            ("with Data Docs", rate["with Data Docs"], "rows/s"),
        )
    ]
    rows.append(
        ratio_row(
            "GX suite vs the 1M rows/s target",
            ("run_suite", rate["run_suite"], "rows/s"),
            ("target", 1e6, "rows/s"),
            1.0,
        )
    )
    notes, details = [], {"gx_rows": n, "gx_rows_per_s": rate}
    details["gx_profile_top"], note = gx_profile(lambda: run_suite(suite, {"train": big}))
    notes.append(note)
    more, note, found = ingestion(50_000 if quick else 5_000_000, scratch)
    rows += more
    notes.append(note)
    details.update(found)
    return {"rows": rows, "notes": notes, "details": details}


def gx_profile(run) -> tuple[list, str]:
    """Where GX spends its time: the functions with the most time of their own."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run)
    stats = pstats.Stats(prof)
    total = stats.total_tt
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:6]
    found = [
        {"function": f"{Path(f).name}:{line}({fn})", "seconds": round(tt, 3)}
        for (f, line, fn), (_, _, tt, _, _) in top
    ]
    note = f"GX time by function (own time, of {total:.2f} s): " + ", ".join(
        f"{Path(f).parent.name}/{Path(f).name}:{fn} {tt / total:.0%}"
        for (f, _, fn), (_, _, tt, _, _) in top
    )
    return found, note


def ingestion(n_csv: int, scratch: Path) -> tuple[list, str, dict]:
    """prepare + validate on a very large CSV, in a copy of the repo, as the pipeline runs
    them: (rows, note, details)."""
    rows = []
    repo = copy_repo(scratch / "repo")
    csv = synthetic_csv(
        scratch / "big" / "penguins.csv", n_csv
    )  # the name picks the committed suite
    set_keys(repo / "params.yaml", {"tabular.data.source": str(csv)})
    prep_s, prep_mb = run_measured([sys.executable, "-m", "stages", "prepare", "tabular"], repo)
    val_s, val_mb = run_measured([sys.executable, "-m", "stages", "validate", "tabular"], repo)
    size_mb = csv.stat().st_size / 2**20
    rows.append(
        Row(
            f"prepare vs validate, {n_csv:,}-row CSV ({size_mb:.0f} MiB)",
            ("prepare", prep_s, "s"),
            ("validate", val_s, "s"),
            prep_s / val_s,
            extra={"rows_per_s": {"prepare": n_csv / prep_s, "validate": n_csv / val_s}},
        )
    )
    rows.append(
        Row(
            "  peak memory (RSS)",
            ("prepare", prep_mb, "MiB"),
            ("validate", val_mb, "MiB"),
            prep_mb / val_mb,
            extra={"csv_mib": size_mb},
        )
    )
    details = dict(
        csv_rows=n_csv,
        csv_mib=size_mb,
        prepare_s=prep_s,
        validate_s=val_s,
        prepare_peak_mib=prep_mb,
        validate_peak_mib=val_mb,
    )
    rows.append(
        ratio_row(
            "prepare vs the 1M rows/s target",
            ("prepare", n_csv / prep_s, "rows/s"),
            ("target", 1e6, "rows/s"),
            1.0,
        )
    )
    rows.append(
        Row(
            "prepare's peak memory vs 3x the CSV",
            ("prepare", prep_mb, "MiB"),
            ("3x CSV", 3 * size_mb, "MiB"),
            prep_mb / (3 * size_mb),
            "<= 1",
            prep_mb <= 3 * size_mb,
        )
    )
    note = (
        f"prepare {n_csv / prep_s:,.0f} rows/s, peak {prep_mb / size_mb:.1f}x the CSV's size; "
        f"validate (3 splits, Data Docs) {n_csv / val_s:,.0f} rows/s"
    )
    return rows, note, details
