"""validate: the tabular suite (profiled from the training split) on every split; stops the
pipeline with a readable summary, naming CSV lines, when the data breaks it.

    python -m stages validate tabular               # creates the suite if it is missing
    python -m stages validate tabular --new-suite   # (re)create it from the training split

The suite lives in data/expectations/tabular/<source name>.json: commit it and edit it.
Outputs: metrics/tabular/validation.json and GX Data Docs in metrics/tabular/datadocs/.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.core.common import log, read_json
from stages.core.expectations import SPLITS, check, load_suite, save_suite, suite_path

NUMERIC_TYPES = ["float64", "float32", "int64", "int32", "Float64", "Int64"]
TEXT_TYPES = ["str"]  # text columns are checked as object: see expectations._gx_frame


def suite(train: pd.DataFrame, schema: dict, range_margin: float, null_margin: float) -> dict:
    """Expectations profiled from the training split: columns, types, nulls, ranges, categories, classes."""
    target = schema["target"]
    features = [f["name"] for f in schema["features"]]
    exps = [{"type": "expect_table_columns_to_match_set",
             "kwargs": {"column_set": features + [target], "exact_match": True}, "meta": {"role": "columns"}}]
    for f in schema["features"]:
        col, s = f["name"], train[f["name"]]
        numeric = f["type"] == "numeric"
        exps.append({"type": "expect_column_values_to_be_in_type_list",
                     "kwargs": {"column": col, "type_list": NUMERIC_TYPES if numeric else TEXT_TYPES}, "meta": {}})
        null_share = float(s.isna().mean())
        exps.append({"type": "expect_column_values_to_not_be_null",
                     "kwargs": {"column": col, "mostly": round(max(0.0, 1 - (2 * null_share + null_margin)), 4)},
                     "meta": {"observed_null_share": round(null_share, 4)}})
        if numeric and s.notna().any():
            lo, hi = float(s.min()), float(s.max())
            pad = range_margin * (hi - lo)
            exps.append({"type": "expect_column_values_to_be_between",
                         "kwargs": {"column": col, "min_value": lo - pad, "max_value": hi + pad},
                         "meta": {"observed": [lo, hi]}})
        elif not numeric:
            exps.append({"type": "expect_column_values_to_be_in_set",
                         "kwargs": {"column": col, "value_set": sorted(s.dropna().astype(str).unique().tolist())},
                         "meta": {}})
    exps.append({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": target}, "meta": {"role": "target"}})
    if schema["task"] == "classification":
        exps.append({"type": "expect_column_values_to_be_in_set",
                     "kwargs": {"column": target, "value_set": schema["classes"]}, "meta": {"role": "target"}})
    return {"name": "tabular", "expectations": exps,
            "meta": {"created_from": f"{schema['source']} (training split, {len(train)} rows)"}}


def run(params: dict, new_suite: bool = False) -> dict:
    prepared = Path("data/prepared/tabular")
    schema = read_json(prepared / "schema.json")
    tables = {name: pd.read_parquet(prepared / f"{name}.parquet") for name in SPLITS}
    path = suite_path("tabular", schema["source"])
    if new_suite or not path.exists():
        v = params["tabular"]["validate"]
        save_suite(path, suite(tables["train"], schema, v["range_margin"], v["null_margin"]))
        log(f"created {path} from the training split: review it, edit it, commit it")
    # Failing rows are reported by index, which holds the source CSV's line numbers, not
    # positions in the parquet files: say so.
    return check([(load_suite(path), tables)], "tabular", [path],
                 {name: f"{prepared}/{name}.parquet, rows numbered by line of {schema['source']}"
                  for name in SPLITS})
