"""Great Expectations (GX Core 1.x) suites: create one from a training table, run it on
named tables, and turn the result into a JSON report and a readable summary.

A suite is a versioned JSON file in GX's own format ({name, expectations: [{type,
kwargs, meta}]}) that a person can edit. `meta.role` marks what inference skips:
"target" expectations, and the "columns" one, which is relaxed to the features.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from stages.common import read_json, write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

NUMERIC_TYPES = ["float64", "float32", "int64", "int32", "Float64", "Int64"]
TEXT_TYPES = ["str"]  # text columns are checked as object: see _gx_frame


def tabular_suite(train: pd.DataFrame, schema: dict, range_margin: float, null_margin: float) -> dict:
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


def image_suite(classes: list[str], v: dict) -> dict:
    """Expectations over the per-image table that `prepare` writes (one row per file)."""
    between = "expect_column_values_to_be_between"
    exps = [
        {"type": "expect_column_values_to_be_null", "kwargs": {"column": "error"}, "meta": {"why": "every file decodes"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "mode", "value_set": v["modes"]}, "meta": {}},
        {"type": between, "kwargs": {"column": "width", "min_value": v["min_size"], "max_value": v["max_size"]},
         "meta": {}},
        {"type": between, "kwargs": {"column": "height", "min_value": v["min_size"], "max_value": v["max_size"]},
         "meta": {}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "label", "value_set": classes}, "meta": {}},
        {"type": between, "kwargs": {"column": "class_count", "min_value": v["min_per_class"]},
         "meta": {"why": "a minimum number of images per class"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "dup_across_splits", "value_set": [False]},
         "meta": {"why": "the same file in two splits leaks test data into training"}},
    ]
    return {"name": "image", "expectations": exps, "meta": {"created_from": "params.yaml image.validate"}}


def detect_suites(names: list[str], v: dict) -> list[dict]:
    """Two suites: one over the per-image table, one over the per-box table."""
    between = "expect_column_values_to_be_between"
    images = [
        {"type": "expect_column_values_to_be_null", "kwargs": {"column": "error"}, "meta": {"why": "every image decodes"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "has_image", "value_set": [True]},
         "meta": {"why": "a label file without an image"}},
        {"type": "expect_column_values_to_be_in_set",
         "kwargs": {"column": "has_label", "value_set": [True], "mostly": v["min_labelled"]},
         "meta": {"why": "images without labels are backgrounds; too many means a broken layout"}},
        {"type": between, "kwargs": {"column": "width", "min_value": v["min_size"], "max_value": v["max_size"]},
         "meta": {}},
        {"type": between, "kwargs": {"column": "height", "min_value": v["min_size"], "max_value": v["max_size"]},
         "meta": {}},
    ]
    boxes = [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "fields", "value_set": [5]},
         "meta": {"why": "class x y w h, all numbers"}},
        {"type": between, "kwargs": {"column": "cls", "min_value": 0, "max_value": len(names) - 1},
         "meta": {"why": "class id in range"}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "class_name"},
         "meta": {"why": "class id is a whole number naming a class"}},
        *({"type": between, "kwargs": {"column": c, "min_value": 0, "max_value": 1}, "meta": {}} for c in "xy"),
        *({"type": between, "kwargs": {"column": c, "min_value": 0, "max_value": 1, "strict_min": True},
           "meta": {"why": "width and height > 0"}} for c in "wh"),
        {"type": "expect_column_distinct_values_to_contain_set", "kwargs": {"column": "class_name", "value_set": names},
         "meta": {"why": "every class has boxes"}},
    ]
    return [{"name": "images", "expectations": images, "meta": {"created_from": "params.yaml detect.validate"}},
            {"name": "boxes", "expectations": boxes, "meta": {"created_from": "params.yaml detect.validate"}}]


def save_suite(path: str | Path, suite: dict) -> None:
    write_json(path, suite)


def load_suite(path: str | Path) -> dict:
    return read_json(path)


def for_inference(suite: dict) -> dict:
    """The suite a prediction input must pass: no target checks, extra columns allowed."""
    exps = []
    for e in suite["expectations"]:
        role = e.get("meta", {}).get("role")
        if role == "target":
            continue
        if role == "columns":
            target = {x["kwargs"]["column"] for x in suite["expectations"] if x.get("meta", {}).get("role") == "target"}
            e = {**e, "kwargs": {"column_set": [c for c in e["kwargs"]["column_set"] if c not in target],
                                 "exact_match": False}}
        exps.append(e)
    return {**suite, "expectations": exps}


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def run_suite(suite: dict, tables: dict[str, pd.DataFrame], docs_dir: str | Path | None = None) -> dict:
    """Validate each named table; returns {success, tables: {name: {success, rows, results}}}.

    With `docs_dir`, GX Data Docs HTML for the run is written there.
    """
    return run_suites([(suite, tables)], docs_dir)


def run_suites(pairs: list[tuple[dict, dict[str, pd.DataFrame]]], docs_dir: str | Path | None = None) -> dict:
    """Several suites, each over its own tables, in one GX context (so one set of Data Docs).
    With more than one suite, table names are prefixed `<suite name>/`."""
    import great_expectations as gx

    ctx = _context()
    asset = ctx.data_sources.add_pandas("tables").add_dataframe_asset("table")
    batch = asset.add_batch_definition_whole_dataframe("whole")
    # The report keeps 5 unexpected values and rows per expectation; only Data Docs show
    # more (every unexpected row, and a query that lists them). Without docs, SUMMARY gives
    # the same report without GX collecting, copying and serialising every unexpected row
    # and filtering the whole table once more per expectation for the query (a fifth of
    # the time on a million rows, more the more rows fail; `make bench`).
    result_format = {"result_format": "COMPLETE", "partial_unexpected_count": 5} if docs_dir is not None else \
        {"result_format": "SUMMARY", "partial_unexpected_count": 5, "return_unexpected_index_query": False}
    report = {"success": True, "suites": [suite["name"] for suite, _ in pairs], "tables": {}}
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="docs", site_config=_docs_site(docs_dir))
    for suite, tables in pairs:
        gx_suite = ctx.suites.add(gx.ExpectationSuite(name=suite["name"], expectations=suite["expectations"]))
        for name, df in tables.items():
            key = f"{suite['name']}/{name}" if len(pairs) > 1 else name
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=key, data=batch, suite=gx_suite))
            if docs_dir is None:
                res = vd.run(batch_parameters={"dataframe": _gx_frame(df)}, result_format=result_format)
            else:
                cp = ctx.checkpoints.add(gx.Checkpoint(
                    name=f"checkpoint_{key}", validation_definitions=[vd], result_format=result_format,
                    actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["docs"])]))
                res = next(iter(cp.run(batch_parameters={"dataframe": _gx_frame(df)}).run_results.values()))
            table = {"success": bool(res.success), "rows": len(df), "results": [_result(r) for r in res.results]}
            report["tables"][key] = table
            report["success"] &= table["success"]
    return report


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GX 1.x compares pandas 3's `str` dtype against a default StringDtype() and never
    matches it, so text columns are handed over as object. The index is unnamed so GX
    reports failing rows as plain row labels (our CSV line numbers)."""
    text = [c for c in df.columns if pd.api.types.is_string_dtype(df[c]) and df[c].dtype != object]
    return df.astype({c: object for c in text}).rename_axis(None)


def _docs_site(docs_dir: str | Path) -> dict:
    return {"class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())}}


def _plain(v):
    """numpy scalars and the like → JSON-friendly Python values."""
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def _result(r) -> dict:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    res = r.result or {}
    out = {"expectation": cfg.type, "column": kwargs.get("column"), "kwargs": kwargs, "success": bool(r.success)}
    if "unexpected_count" in res:
        out["unexpected_count"] = int(res["unexpected_count"])
        out["unexpected_percent"] = _plain(res.get("unexpected_percent"))
        out["sample_values"] = [_plain(v) for v in res.get("partial_unexpected_list", [])[:5]]
        out["sample_rows"] = [_plain(v) for v in res.get("partial_unexpected_index_list", [])[:5]]
    if "observed_value" in res:
        obs = res["observed_value"]
        out["observed"] = [_plain(v) for v in obs] if isinstance(obs, list) else _plain(obs)
    if r.exception_info and r.exception_info.get("raised_exception"):
        out["error"] = r.exception_info.get("exception_message")
    return out


def summarise(report: dict, sources: dict[str, str] | None = None, limit: int = 10) -> str:
    """A few readable lines per failing table: expectation, column, bad values and their rows."""
    lines = []
    for name, table in report["tables"].items():
        failed = [r for r in table["results"] if not r["success"]]
        if not failed:
            continue
        where = f"{name} ({sources[name]})" if sources and name in sources else name
        lines.append(f"{where}: {len(failed)} of {len(table['results'])} expectations failed")
        for r in failed[:limit]:
            what = r["expectation"] + (f" on column {r['column']!r}" if r["column"] else "")
            detail = {k: v for k, v in r["kwargs"].items() if k != "column"}
            line = f"  - {what} {detail}"
            if "unexpected_count" in r:
                pairs = ", ".join(f"{v!r} (row {i})" for v, i in zip(r["sample_values"], r["sample_rows"]))
                line += f": {r['unexpected_count']} unexpected, e.g. {pairs}"
            elif "observed" in r:
                line += f": observed {r['observed']}"
            if "error" in r:
                line += f": {r['error']}"
            lines.append(line)
        if len(failed) > limit:
            lines.append(f"  ... and {len(failed) - limit} more")
    return "\n".join(lines)
