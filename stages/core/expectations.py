"""Great Expectations (GX Core 1.x), the engine every task's validation runs on: a suite's
file, running suites on named tables, the JSON report, Data Docs and a readable summary.
Each task builds its own suite (stages/<task>/validate.py).

A suite is a versioned JSON file in GX's own format ({name, expectations: [{type,
kwargs, meta}]}) that a person can edit. `meta.role` marks what inference skips:
"target" expectations, and the "columns" one, which is relaxed to the features.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from stages.core.common import StageError, atomic_dir, log, read_json, write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

SPLITS = ("train", "val", "test")


def suite_path(task: str, source: str, part: str = "") -> Path:
    """One suite per data source, so switching the data never validates against a stale suite."""
    return Path("data/expectations") / task / f"{Path(source).stem}{'.' + part if part else ''}.json"


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


def check(pairs: list[tuple[dict, dict[str, pd.DataFrame]]], task: str, paths: list[Path],
          sources: dict[str, str]) -> dict:
    """Run the suites, write the report and Data Docs, and fail loudly if any table breaks them."""
    with atomic_dir(Path("metrics") / task / "datadocs") as docs:
        report = run_suites(pairs, docs_dir=docs)
    report["suite_file"] = ", ".join(str(p) for p in paths)
    path = " and ".join(str(p) for p in paths)
    write_json(Path("metrics") / task / "validation.json", report)
    total = sum(len(t["results"]) for t in report["tables"].values())
    if not report["success"]:
        raise StageError(f"data does not meet the expectations in {path}\n{summarise(report, sources)}\n"
                         f"Fix the data, or edit {path} if the change is intended. "
                         f"Full report: metrics/{task}/validation.json, metrics/{task}/datadocs/index.html")
    log(f"validation passed: {total} checks over {', '.join(report['tables'])} ({path})")
    return report
