"""validate: the tabular suite (profiled from the whole table) on every split; stops the
pipeline with a readable summary, naming CSV lines, when the data breaks it.

    python -m stages validate tabular               # creates the suite if it is missing; when
                                                    # columns changed, rebuilds only theirs
    python -m stages validate tabular --new-suite   # (re)create it from the whole table

The suite lives in data/expectations/tabular/<source name>.json: commit it and edit it.
Outputs: metrics/tabular/validation.json and GX Data Docs in metrics/tabular/datadocs/.

Engines (`tabular.data.engine`): pandas validates each split in chunks of
`tabular.validate.chunk_rows` rows, so no split is ever whole in memory; Spark runs the same
suite JSON on Spark DataFrames.
"""

from __future__ import annotations

import math
from pathlib import Path

from stages.core import layout
from stages.core.cli import log
from stages.core.documents import Columns
from stages.core.expectations import SPLITS, check, load_suite, save_suite, suite_path
from stages.core.schema import Params
from stages.tabular.data import split_chunks

# Type names for both engines: pandas (float64; "str" for text given as Python objects,
# "StringDtype" for text columns, see expectations._gx_frame) and Spark (DoubleType, StringType).
NUMERIC_TYPES = [
    "float64",
    "float32",
    "int64",
    "int32",
    "Float64",
    "Int64",
    "DoubleType",
    "FloatType",
    "LongType",
    "IntegerType",
]
TEXT_TYPES = ["str", "StringDtype", "StringType"]


def null_mostly(nulls: int, rows: int, smallest: int, confidence: float) -> float:
    """GX's `mostly` for a not-null check: the share of non-null cells that a table of
    `smallest` rows, drawn from the same source as the training split (`nulls` of `rows`
    missing), keeps with probability `confidence`. Two bounds, each at `confidence`: the
    true null share is at most the Clopper-Pearson upper bound from train, and the table's
    null count is at most the binomial quantile at that share. Small tables get loose
    bounds (4 of 27 nulls is sampling noise at 3.4%); large ones tight."""
    from scipy.stats import beta, binom

    share = 1.0 if nulls >= rows else float(beta.ppf(confidence, nulls + 1, rows - nulls))
    allowed = float(binom.ppf(confidence, smallest, share)) / smallest
    return max(
        0.0, math.floor((1 - allowed) * 1e4) / 1e4
    )  # rounded down: never stricter than the bound


def suite(profile: dict, schema: Columns, range_margin: float, confidence: float) -> dict:
    """Expectations profiled from the whole table (`profile`: per column rows, nulls, min,
    max, values over all splits): columns, types, nulls (sized to the smallest split),
    ranges, categories, classes. Every split passes it, and so does a clean resample."""
    target = schema.target
    features = [f.name for f in schema.features]
    rows = sum(schema.rows.values())
    smallest = max(1, min(schema.rows.values()))
    exps = [columns_expectation(features + [target])]
    for f in schema.features:
        exps += column_expectations(f, profile[f.name], rows, smallest, range_margin, confidence)
    exps += target_expectations(schema)
    return {
        "name": "tabular",
        "expectations": exps,
        "meta": {"created_from": f"{schema.source} (all splits, {rows} rows)"},
    }


def columns_expectation(columns: list[str]) -> dict:
    return {
        "type": "expect_table_columns_to_match_set",
        "kwargs": {"column_set": columns, "exact_match": True},
        "meta": {"role": "columns"},
    }


def column_expectations(
    f: dict, st: dict, rows: int, smallest: int, range_margin: float, confidence: float
) -> list[dict]:
    """One feature's expectations: its type, its nulls, and its range or set of categories."""
    col, numeric = f.name, f.type == "numeric"
    exps = [
        {
            "type": "expect_column_values_to_be_in_type_list",
            "kwargs": {"column": col, "type_list": NUMERIC_TYPES if numeric else TEXT_TYPES},
            "meta": {"kind": f.type},
        },
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {
                "column": col,
                "mostly": null_mostly(st["nulls"], rows, smallest, confidence),
            },
            "meta": {
                "observed_null_share": round(st["nulls"] / rows, 4),
                "confidence": confidence,
                "sized_for_rows": smallest,
            },
        },
    ]
    if numeric and st["min"] is not None:
        lo, hi = st["min"], st["max"]
        # A constant column still gets a margin (of its value's size).
        pad = range_margin * ((hi - lo) or max(abs(lo), 1.0))
        exps.append(
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": col, "min_value": lo - pad, "max_value": hi + pad},
                "meta": {"observed": [lo, hi]},
            }
        )
    elif f.type == "categorical":
        # The set seen in the whole table: new data with a category never seen fails here,
        # before the model would reject it. Text and dates have no closed set.
        exps.append(
            {
                "type": "expect_column_values_to_be_in_set",
                "kwargs": {"column": col, "value_set": st["values"]},
                "meta": {},
            }
        )
    return exps


def target_expectations(schema: Columns) -> list[dict]:
    target = schema.target
    exps = [
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": target},
            "meta": {"role": "target"},
        }
    ]
    if schema.task == "classification":
        exps.append(
            {
                "type": "expect_column_values_to_be_in_set",
                "kwargs": {"column": target, "value_set": schema.classes},
                "meta": {"role": "target"},
            }
        )
    return exps


def stored_types(old: dict) -> dict[str, str]:
    """{column: type} of a stored suite, from its type checks (older suites: numeric or
    categorical)."""
    out = {}
    for e in old["expectations"]:
        if e["type"] == "expect_column_values_to_be_in_type_list":
            numeric = "float64" in e["kwargs"]["type_list"]
            col_type = e.get("meta", {}).get("type") or ("numeric" if numeric else "categorical")
            out[e["kwargs"]["column"]] = col_type
    return out


def _column(e: dict):
    return e["kwargs"].get("column")


def merge_suite(old: dict, fresh: dict, schema: Columns) -> tuple[dict, list[str]]:
    """The stored suite with only the changed columns' expectations rebuilt from `fresh`
    (columns added, dropped or retyped, or a new target): the user's edits to the others
    survive. Returns it and what changed (none: the stored suite as it is)."""
    before = stored_types(old)
    now = {f.name: f.type for f in schema.features}
    target = schema.target
    old_targets = {
        _column(e) for e in old["expectations"] if e.get("meta", {}).get("role") == "target"
    }
    retyped = {c for c, k in now.items() if c in before and before[c] != k}
    redo = {c for c in now if c not in before} | {c for c in before if c not in now} | retyped
    changes = [f"added {c!r}" for c in now if c not in before]
    changes += [f"dropped {c!r}" for c in before if c not in now]
    changes += [f"retyped {c!r} ({before[c]} → {now[c]})" for c in sorted(retyped)]
    if old_targets != {target}:
        changes.append(f"the target is {target!r}")
        redo |= old_targets | {target}
    if not changes:
        return old, []
    kept = [
        e
        for e in old["expectations"]
        if e.get("meta", {}).get("role") != "columns" and _column(e) not in redo
    ]
    added = [e for e in fresh["expectations"][1:] if _column(e) in redo]
    return {**old, "expectations": [fresh["expectations"][0], *kept, *added]}, changes


def profile(paths: list[Path] | Path, schema: Columns) -> dict:
    """Per feature over the prepared splits: rows, nulls, min, max, sorted values
    (categories); one column in memory at a time."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    paths = [paths] if isinstance(paths, str | Path) else paths
    data = ds.dataset([str(p) for p in paths], format="parquet")
    out = {}
    for f in schema.features:
        col = data.to_table(columns=[f.name]).column(0)
        st = {"rows": len(col), "nulls": col.null_count, "min": None, "max": None, "values": None}
        if f.type == "numeric":
            mm = pc.min_max(col)
            st["min"], st["max"] = mm["min"].as_py(), mm["max"].as_py()
        elif f.type == "categorical":
            st["values"] = sorted(pc.drop_null(pc.unique(col)).to_pylist())
        out[f.name] = st
    return out


def run(params: Params, new_suite: bool = False) -> dict:
    prepared = layout.prepared("tabular")
    schema = Columns.read(prepared / layout.columns("tabular").name)
    # the engine that prepared the splits
    spark = schema.params.get("tabular.data", {}).get("engine") == "spark"
    path = suite_path("tabular", schema.source)
    v = params.tabular.validate_
    splits = [prepared / f"{name}.parquet" for name in SPLITS]
    if spark:
        from stages.tabular.spark import profile as spark_profile

        stats = spark_profile(splits, schema)
    else:
        stats = profile(splits, schema)
    fresh = suite(stats, schema, v.range_margin, v.confidence)
    if new_suite or not path.exists():
        save_suite(path, fresh)
        log(f"created {path} from the whole table: review it, edit it, commit it")
    else:
        merged, changes = merge_suite(load_suite(path), fresh, schema)
        if changes:
            save_suite(path, merged)
            log(
                f"updated {path}: {'; '.join(changes)}; only those columns' expectations were "
                "rebuilt, the others are as stored"
            )
    if spark:
        from stages.core.spark import session

        tables = {
            name: session().read.parquet(str(prepared / f"{name}.parquet")) for name in SPLITS
        }
    else:
        rows = params.tabular.validate_.chunk_rows
        tables = {
            name: (lambda name=name: split_chunks(prepared / f"{name}.parquet", rows))
            for name in SPLITS
        }
    # Failing rows are reported by line, the source CSV's line numbers, not positions in the
    # parquet files: say so.
    return check(
        [(load_suite(path), tables)],
        "tabular",
        [path],
        {
            name: f"{prepared}/{name}.parquet, rows numbered by line of {schema.source}"
            for name in SPLITS
        },
    )
