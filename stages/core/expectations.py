"""Great Expectations (GX Core 1.x), the engine every task's validation runs on: a suite's
file, running suites on named tables, the JSON report, Data Docs and a readable summary.
Each task builds its own suite (stages/<task>/validate.py).

A suite is a versioned JSON file in GX's own format ({name, expectations: [{type,
kwargs, meta}]}) that a person can edit. `meta.role` marks what inference skips:
"target" expectations, and the "columns" one, which is relaxed to the features.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import warnings
from pathlib import Path

import pandas as pd

from stages.core import gx_patches, layout
from stages.core.cli import StageError, log
from stages.core.files import atomic_dir, read_json, write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# GX imports pyspark when it is installed (the spark extra), which warns about pandas 3 on
# every stage's stderr; the Spark paths here hand it no pandas frames.
warnings.filterwarnings(
    "ignore", message="PySpark does not yet fully support pandas", category=FutureWarning
)

SPLITS = ("train", "val", "test")


def suite_path(task: str, source: str, part: str = "") -> Path:
    """One suite per data source, so switching the data never validates against a stale suite."""
    return layout.expectations(task) / f"{Path(source).stem}{'.' + part if part else ''}.json"


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
            target = {
                x["kwargs"]["column"]
                for x in suite["expectations"]
                if x.get("meta", {}).get("role") == "target"
            }
            e = {
                **e,
                "kwargs": {
                    "column_set": [c for c in e["kwargs"]["column_set"] if c not in target],
                    "exact_match": False,
                },
            }
        exps.append(e)
    return {**suite, "expectations": exps}


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    gx_patches.apply()  # GX's internals made faster, in one place (stages/core/gx_patches.py)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


@functools.cache
def _cached(engine: str):
    """GX's fixed cost, paid once per process (the app, `infer` over chunks, the bench): a
    context with a datasource, and a counter for unique suite names within it."""
    ctx = _context()
    source = (
        ctx.data_sources.add_spark("spark")
        if engine == "spark"
        else ctx.data_sources.add_pandas("tables")
    )
    return (
        ctx,
        source.add_dataframe_asset("table").add_batch_definition_whole_dataframe("whole"),
        itertools.count(),
    )


def run_suite(suite: dict, tables: dict, docs_dir: str | Path | None = None) -> dict:
    """Validate each named table; returns {success, tables: {name: {success, rows, results}}}.

    With `docs_dir`, GX Data Docs HTML for the run is written there.
    """
    return run_suites([(suite, tables)], docs_dir)


def _result_format(docs: bool, engine: str) -> dict:
    """The report keeps 5 unexpected values and rows per expectation; only Data Docs show more
    (every unexpected row, and a query that lists them). Without docs, SUMMARY gives the same
    report without GX collecting, copying and serialising every unexpected row and filtering
    the whole table once more per expectation for the query (a fifth of the time on a million
    rows, more the more rows fail; `make bench`). On Spark, COMPLETE would collect every
    failing row on the driver: SUMMARY always."""
    complete = docs and engine == "pandas"
    result_format = {
        "result_format": "COMPLETE" if complete else "SUMMARY",
        "partial_unexpected_count": 5,
    }
    if not complete:
        result_format["return_unexpected_index_query"] = False
    if engine == "spark":
        result_format["unexpected_index_column_names"] = ["line"]
    return result_format


def _suite_groups(ctx, suite: dict, suite_name: str, engine: str, docs: bool) -> tuple:
    """(the whole suite as GX's or None, [(columns, expectation indices, GX suite)]).

    The whole suite as GX's: Spark validates it at once (it reads only the columns it
    needs anyway); Data Docs need it stored in the context, with a validation definition.
    Without docs, storing them was a fifth of a small run's time."""
    import great_expectations as gx

    gx_suite = None
    if engine == "spark" or docs:
        gx_suite = gx.ExpectationSuite(name=suite_name, expectations=suite["expectations"])
        gx_suite = ctx.suites.add(gx_suite) if docs else gx_suite
    if engine == "spark":
        return gx_suite, [(None, range(len(suite["expectations"])), gx_suite)]
    exps = suite["expectations"]
    return gx_suite, [
        (
            cols,
            at,
            gx.ExpectationSuite(name=f"{suite_name}/{i}", expectations=[exps[j] for j in at]),
        )
        for i, (cols, at) in enumerate(_column_groups(exps))
    ]


def _validate_with_docs(
    ctx, batch, key: str, run_id: int, gx_suite, frame, result_format: dict
) -> list:
    """One chunk through a stored validation definition and checkpoint: Data Docs written."""
    import great_expectations as gx

    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(
            name=key + (f"#{run_id}" if run_id else ""), data=batch, suite=gx_suite
        )
    )
    cp = ctx.checkpoints.add(
        gx.Checkpoint(
            name=f"checkpoint_{key}",
            validation_definitions=[vd],
            result_format=result_format,
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["docs"])],
        )
    )
    with gx_patches.one_validation():
        res = next(iter(cp.run(batch_parameters={"dataframe": frame}).run_results.values()))
    return [_result(r) for r in res.results]


def run_suites(pairs: list[tuple[dict, dict]], docs_dir: str | Path | None = None) -> dict:
    """Several suites, each over its own tables, in one GX context (so one set of Data Docs).
    With more than one suite, table names are prefixed `<suite name>/`.

    A table is a pandas DataFrame, a Spark DataFrame (with a `line` column naming failing
    rows), or a function returning an iterator of pandas chunks: a table larger than memory,
    validated chunk by chunk with the results added up (Data Docs show the first chunk)."""
    engine = (
        "spark" if any(_is_spark(t) for _, tables in pairs for t in tables.values()) else "pandas"
    )
    if docs_dir is None:
        ctx, batch, counter = _cached(engine)
    else:  # a fresh context per docs site: Data Docs list every run of their context
        ctx, batch, counter = _cached.__wrapped__(engine)
        ctx.add_data_docs_site(site_name="docs", site_config=_docs_site(docs_dir))
    result_format = _result_format(docs_dir is not None, engine)
    report = {"success": True, "suites": [suite["name"] for suite, _ in pairs], "tables": {}}
    for suite, tables in pairs:
        if engine == "spark":
            suite = _with_line(suite)
        run_id = next(counter)
        suite_name = f"{suite['name']}" + (f"#{run_id}" if run_id else "")
        gx_suite, groups = _suite_groups(ctx, suite, suite_name, engine, docs_dir is not None)
        for name, table in tables.items():
            key = f"{suite['name']}/{name}" if len(pairs) > 1 else name
            chunks = table() if callable(table) else [table]
            merged, rows = None, 0
            for i, chunk in enumerate(chunks):
                frame = chunk if engine == "spark" else _gx_frame(chunk)
                if docs_dir is None or i:
                    results = _validate(batch, groups, frame, result_format)
                else:
                    results = _validate_with_docs(
                        ctx, batch, key, run_id, gx_suite, frame, result_format
                    )
                merged = (
                    results
                    if merged is None
                    else [_merge(a, b) for a, b in zip(merged, results, strict=False)]
                )
                rows += chunk.count() if engine == "spark" else len(chunk)
            table_report = {
                "success": all(r["success"] for r in merged or []),
                "rows": rows,
                "results": merged or [],
            }
            report["tables"][key] = table_report
            report["success"] &= table_report["success"]
    return report


class Aside:
    """A run_suite under way in the validation worker: call it for the report."""

    def __init__(self, conn):
        self.conn, self.report = conn, None

    def __call__(self) -> dict:
        if self.report is None:
            try:
                kind, value = self.conn.recv()
            except EOFError:
                _stop_worker()
                raise StageError("the validation process died (out of memory?)") from None
            if kind == "error":
                raise StageError(value)
            self.report = value
        return self.report

    def cancel(self) -> None:
        """Drop a report not yet waited for: the worker is stopped (the next call starts
        another), so an abandoned run never hands its report to the next one."""
        if self.report is None:
            _stop_worker()


def run_suite_aside(suite: dict, tables: dict) -> Aside:
    """run_suite in the validation worker, a process of its own, while this one goes on;
    call the result for the report, or cancel it. GX is pure Python: in a thread it holds
    the GIL against the work it was meant to overlap; in a process it runs on another core.

    Tables travel pickled, so a large one should be a function that reads it in chunks
    (see run_suites): `infer` sends the function that reads its source, and the worker reads
    the file itself rather than receive 8 MB per 100,000 rows through a pipe (30 ms, as
    long as GX). The worker is forked once, by the first call, and kept: a process forked
    later, from a parent holding the data, makes each page the parent writes next a copy
    (copy-on-write, 30-50 ms more per 100,000 rows), and it would pay GX's first-use costs
    (3 s) again. It runs in this process's working folder of the moment. Where there is no
    fork, the suite runs here and now."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        done = Aside(None)
        done.report = run_suite(suite, tables)
        return done
    with _worker_lock:
        global _worker
        if _worker is None or not _worker[0].is_alive():
            ctx = multiprocessing.get_context("fork")
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs,), daemon=True, name="validation")
            proc.start()
            theirs.close()
            _worker = proc, mine
        _worker[1].send((os.getcwd(), suite, tables))
        return Aside(_worker[1])


_worker_lock = threading.Lock()
_worker = None  # (process, connection) of the validation worker


def _stop_worker() -> None:
    global _worker
    with _worker_lock:
        if _worker is not None:
            _worker[0].kill()
            _worker[0].join()
            _worker[1].close()
            _worker = None


def _serve(conn) -> None:
    _cached("pandas")  # GX's imports and context, while the first request is on its way
    while True:
        try:
            cwd, suite, tables = conn.recv()
        except EOFError:  # the parent is gone
            return
        try:
            os.chdir(cwd)
            conn.send(("report", run_suite(suite, tables)))
        except StageError as e:  # bad input (the parent raises it as it is)
            conn.send(("error", str(e)))
        except BaseException as e:  # noqa: BLE001 (the parent raises it, with its message)
            conn.send(("error", f"validation failed to run: {type(e).__name__}: {e}"))


def _column_groups(expectations: list[dict]) -> list[tuple[list[str] | None, list[int]]]:
    """The suite's expectations (by position) grouped by the columns they read; None: the
    whole table (table-level expectations, and any this does not know)."""
    groups: dict = {}
    for i, e in enumerate(expectations):
        kw = e["kwargs"]
        cols = [kw[k] for k in ("column", "column_A", "column_B") if k in kw] + list(
            kw.get("column_list", [])
        )
        groups.setdefault(tuple(cols) or None, []).append(i)
    return [(list(cols) if cols else None, at) for cols, at in groups.items()]


def _validate(batch, groups: list, frame, result_format: dict) -> list[dict]:
    """A table validated one column group at a time, each on a frame of only its columns;
    the results in the suite's order, as one validation of the whole table gives them.
    Why: for every column expectation GX filters the whole pandas frame (every column) to
    the rows where that column is not null, up to three times; on one column that is an
    eighth of the copying for the demo's eight (twice as fast on a million rows; `make
    bench`). Batch.validate, not a validation definition's run: the same results without
    serialising them into the context's results store (a quarter of a small run's time)."""
    results: dict[int, dict] = {}
    for cols, at, sub in groups:
        if cols is not None and not set(cols) <= set(frame.columns):
            cols = None  # a missing column: GX's own error, from the whole table
        part = frame if cols is None else frame[cols]
        with gx_patches.one_validation():
            res = batch.get_batch(batch_parameters={"dataframe": part}).validate(
                sub, result_format=result_format
            )
        results.update(zip(at, (_result(r) for r in res.results), strict=False))
    return [results[i] for i in sorted(results)]


def _with_line(suite: dict) -> dict:
    """On Spark the `line` column names failing rows: the columns check allows it."""
    exps = [
        {**e, "kwargs": {**e["kwargs"], "column_set": [*e["kwargs"]["column_set"], "line"]}}
        if e.get("meta", {}).get("role") == "columns"
        else e
        for e in suite["expectations"]
    ]
    return {**suite, "expectations": exps}


def _is_spark(table) -> bool:
    return type(table).__module__.startswith("pyspark")


def _merge(a: dict, b: dict) -> dict:
    """One expectation's results over two chunks, as if run over both at once: counts add
    up, samples are the first five, and `mostly` is judged on the totals."""
    if "considered" not in a:
        return {
            **a,
            "success": a["success"] and b["success"],
        }  # table-level (columns): the same on every chunk
    out = {
        **a,
        "considered": a["considered"] + b["considered"],
        "unexpected_count": a["unexpected_count"] + b["unexpected_count"],
        "sample_values": (a["sample_values"] + b["sample_values"])[:5],
        "sample_rows": (a["sample_rows"] + b["sample_rows"])[:5],
    }
    share = out["unexpected_count"] / out["considered"] if out["considered"] else 0.0
    out["unexpected_percent"] = 100 * share
    mostly = a["kwargs"].get("mostly")
    out["success"] = (
        (1 - share >= mostly - 1e-12) if mostly is not None else out["unexpected_count"] == 0
    )
    if "error" in a or "error" in b:
        out["success"] = False
    return out


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Text columns (pandas 3's `str` dtype) are handed over as pandas' default StringDtype():
    GX 1.x compares a column's dtype against the instances its type names create, and only
    "StringDtype" creates one that matches (never `str`'s), so type lists name it (see
    stages/tabular/validate.py) and GX checks the dtype once instead of every value in
    Python (half of GX's time on a million rows; `make bench`). Object columns (mixed input)
    stay object and are checked value by value. The index is unnamed so GX reports failing
    rows as plain row labels (our CSV line numbers)."""
    text = [c for c in df.columns if pd.api.types.is_string_dtype(df[c]) and df[c].dtype != object]
    return df.astype({c: pd.StringDtype() for c in text}).rename_axis(None)


def _docs_site(docs_dir: str | Path) -> dict:
    return {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(Path(docs_dir).resolve()),
        },
    }


def _plain(v):
    """numpy scalars and the like → JSON-friendly Python values."""
    if v is pd.NA:
        return None
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def _result(r) -> dict:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    res = r.result or {}
    out = {
        "expectation": cfg.type,
        "column": kwargs.get("column"),
        "kwargs": kwargs,
        "success": bool(r.success),
    }
    if "unexpected_count" in res:
        out["unexpected_count"] = int(res["unexpected_count"])
        out["unexpected_percent"] = _plain(res.get("unexpected_percent"))
        # Rows a `mostly` share is taken of: all (not-null checks), else the non-missing ones.
        missing = (
            0
            if cfg.type == "expect_column_values_to_not_be_null"
            else int(res.get("missing_count") or 0)
        )
        out["considered"] = int(res.get("element_count") or 0) - missing
        out["sample_values"] = [_plain(v) for v in res.get("partial_unexpected_list", [])[:5]]
        # pandas names a failing row by its index (the CSV line); Spark by the `line` column.
        out["sample_rows"] = [
            _plain(v["line"] if isinstance(v, dict) else v)
            for v in res.get("partial_unexpected_index_list", [])[:5]
        ]
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
                pairs = ", ".join(
                    f"{v!r} (row {i})"
                    for v, i in zip(r["sample_values"], r["sample_rows"], strict=False)
                )
                line += f": {r['unexpected_count']} unexpected, e.g. {pairs}"
            elif "observed" in r:
                line += f": observed {r['observed']}"
            if "error" in r:
                line += f": {r['error']}"
            lines.append(line)
        if len(failed) > limit:
            lines.append(f"  ... and {len(failed) - limit} more")
    return "\n".join(lines)


def check(
    pairs: list[tuple[dict, dict[str, pd.DataFrame]]],
    task: str,
    paths: list[Path],
    sources: dict[str, str],
) -> dict:
    """Run the suites, write the report and Data Docs, and fail loudly if any table breaks them."""
    with atomic_dir(layout.datadocs(task)) as docs:
        report = run_suites(pairs, docs_dir=docs)
    report["suite_file"] = ", ".join(str(p) for p in paths)
    path = " and ".join(str(p) for p in paths)
    write_json(layout.validation(task), report)
    total = sum(len(t["results"]) for t in report["tables"].values())
    if not report["success"]:
        raise StageError(
            f"data does not meet the expectations in {path}\n{summarise(report, sources)}\n"
            f"Fix the data, or edit {path} if the change is intended. "
            f"Full report: {layout.validation(task)}, {layout.datadocs(task)}/index.html"
        )
    log(f"validation passed: {total} checks over {', '.join(report['tables'])} ({path})")
    return report
