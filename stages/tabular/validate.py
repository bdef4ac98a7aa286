"""validate: the tabular suite (profiled from the training split) on every split; stops the
pipeline with a readable summary, naming CSV lines, when the data breaks it.

    python -m stages validate tabular               # creates the suite if it is missing
    python -m stages validate tabular --new-suite   # (re)create it from the training split

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
from stages.core.expectations import SPLITS, check, load_suite, save_suite, suite_path
from stages.core.files import read_json
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


def suite(profile: dict, schema: dict, range_margin: float, confidence: float) -> dict:
    """Expectations profiled from the training split (`profile`: per column rows, nulls,
    min, max, values): columns, types, nulls (sized to the smallest split), ranges,
    categories, classes."""
    target = schema["target"]
    features = [f["name"] for f in schema["features"]]
    rows = schema["rows"]["train"]
    smallest = max(1, min(schema["rows"].values()))
    exps = [
        {
            "type": "expect_table_columns_to_match_set",
            "kwargs": {"column_set": features + [target], "exact_match": True},
            "meta": {"role": "columns"},
        }
    ]
    for f in schema["features"]:
        col, p = f["name"], profile[f["name"]]
        numeric = f["type"] == "numeric"
        exps.append(
            {
                "type": "expect_column_values_to_be_in_type_list",
                "kwargs": {"column": col, "type_list": NUMERIC_TYPES if numeric else TEXT_TYPES},
                "meta": {},
            }
        )
        exps.append(
            {
                "type": "expect_column_values_to_not_be_null",
                "kwargs": {
                    "column": col,
                    "mostly": null_mostly(p["nulls"], rows, smallest, confidence),
                },
                "meta": {
                    "observed_null_share": round(p["nulls"] / rows, 4),
                    "confidence": confidence,
                    "sized_for_rows": smallest,
                },
            }
        )
        if numeric and p["min"] is not None:
            lo, hi = p["min"], p["max"]
            # A column constant in train still gets a margin (of its value's size).
            pad = range_margin * ((hi - lo) or max(abs(lo), 1.0))
            exps.append(
                {
                    "type": "expect_column_values_to_be_between",
                    "kwargs": {"column": col, "min_value": lo - pad, "max_value": hi + pad},
                    "meta": {"observed": [lo, hi]},
                }
            )
        elif not numeric:
            # Every category of val and test is in train (prepare moves rows whose category
            # train lacks), so the set is exact for the splits; new data with a category
            # never seen in training fails here, before the model would reject it.
            exps.append(
                {
                    "type": "expect_column_values_to_be_in_set",
                    "kwargs": {"column": col, "value_set": p["values"]},
                    "meta": {},
                }
            )
    exps.append(
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": target},
            "meta": {"role": "target"},
        }
    )
    if schema["task"] == "classification":
        exps.append(
            {
                "type": "expect_column_values_to_be_in_set",
                "kwargs": {"column": target, "value_set": schema["classes"]},
                "meta": {"role": "target"},
            }
        )
    return {
        "name": "tabular",
        "expectations": exps,
        "meta": {"created_from": f"{schema['source']} (training split, {rows} rows)"},
    }


def profile(path: Path, schema: dict) -> dict:
    """Per feature of a prepared split: rows, nulls, min, max, sorted values (categories);
    one column in memory at a time."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    data = ds.dataset(path, format="parquet")
    out = {}
    for f in schema["features"]:
        col = data.to_table(columns=[f["name"]]).column(0)
        p = {"rows": len(col), "nulls": col.null_count, "min": None, "max": None, "values": None}
        if f["type"] == "numeric":
            mm = pc.min_max(col)
            p["min"], p["max"] = mm["min"].as_py(), mm["max"].as_py()
        else:
            p["values"] = sorted(pc.drop_null(pc.unique(col)).to_pylist())
        out[f["name"]] = p
    return out


def run(params: dict, new_suite: bool = False) -> dict:
    prepared = layout.prepared("tabular")
    schema = read_json(prepared / "schema.json")
    spark = (
        schema["params"]["tabular.data"].get("engine") == "spark"
    )  # the engine that prepared the splits
    path = suite_path("tabular", schema["source"])
    if new_suite or not path.exists():
        v = params["tabular"]["validate"]
        if spark:
            from stages.tabular.spark import profile as spark_profile

            stats = spark_profile(prepared / "train.parquet", schema)
        else:
            stats = profile(prepared / "train.parquet", schema)
        save_suite(path, suite(stats, schema, v["range_margin"], v["confidence"]))
        log(f"created {path} from the training split: review it, edit it, commit it")
    if spark:
        from stages.core.spark import session

        tables = {
            name: session().read.parquet(str(prepared / f"{name}.parquet")) for name in SPLITS
        }
    else:
        rows = params["tabular"]["validate"]["chunk_rows"]
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
            name: f"{prepared}/{name}.parquet, rows numbered by line of {schema['source']}"
            for name in SPLITS
        },
    )
