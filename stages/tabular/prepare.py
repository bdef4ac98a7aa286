"""prepare: any CSV → typed train/val/test parquet splits + schema.json in data/prepared/tabular/.

    python -m stages prepare tabular

Two engines, `tabular.data.engine`, giving the same splits row for row:
- `pandas` (the default; the name says "one machine"): streams the CSV twice with pyarrow,
  never holding the table. pyarrow rather than DuckDB or Polars: it is already installed (pandas
  reads parquet through it), its CSV reader streams record batches of a fixed byte size, and
  its compute kernels (regex match, cast, dictionary encode) type a column without Python
  loops. Pass 1 gathers what typing and splitting need (counts, the first bad cells, category
  codes); pass 2 writes typed row groups into train.parquet, val.parquet and test.parquet,
  with the CSV line as the (pandas) index.
- `spark`: the same with Spark SQL, on the cluster at SPARK_MASTER; the splits are folders of
  parquet parts with a `line` column (stages/core/spark.py).

Splits (`tabular.data.split.method`): `hash` ranks rows by a hash of (seed, line) within each
class (stratified; regression: one group) and cuts each class at its rounded val/test shares,
so both engines compute it alike; `sklearn` is scikit-learn's train_test_split (pandas only).
Either way, rows whose category (in any feature) would appear nowhere in train are moved to
train: a category the model never saw cannot be scored, and the suite profiled from train
would flag it (docs/tabular.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.core.common import StageError, atomic_dir, log, write_json
from stages.core.splits import NAMES, TEST, TRAIN, VAL, hash_assign, quotas, row_hash, sklearn_assign
from stages.tabular.data import (DISTINCT_CAP, NUMBER_RE, ColumnStats, check_classes, column_kinds, csv_batches,
                                 csv_header, open_csv, split_schema)

ENGINES = ("pandas", "spark")
METHODS = ("hash", "sklearn")
NO_CODE = -1  # a missing cell, or a column whose values are no longer tracked


def run(params: dict, out_dir: str = "data/prepared/tabular") -> dict:
    p = params["tabular"]["data"]
    engine, method = p.get("engine", "pandas"), p["split"].get("method", "hash")
    if engine not in ENGINES:
        raise StageError(f"tabular.data.engine is {engine!r}; choose one of: {', '.join(ENGINES)}")
    if method not in METHODS or (engine == "spark" and method != "hash"):
        raise StageError(f"tabular.data.split.method is {method!r}; choose hash"
                         + (" (the only split Spark computes)" if engine == "spark" else " or sklearn"))
    source = p["source"]
    path, sep = open_csv(source)
    unknown = [c for c in p["drop_columns"] if c not in [h.strip() for h in csv_header(path, sep)]]
    if unknown:
        log(f"warning: tabular.data.drop_columns names columns not in {source}: {', '.join(unknown)}")
    if engine == "spark":
        from stages.tabular.spark import prepare as spark_prepare

        with atomic_dir(out_dir) as tmp:
            schema = spark_prepare(path, sep, p, params["seed"], tmp)
            write_json(tmp / "schema.json", schema)
    else:
        scan = Scan(path, sep, p["drop_columns"], p["target"], p["max_categories"])
        kinds, classes, codes, moved = plan(scan, p, params["seed"])
        schema = describe(p, params["seed"], kinds, classes, codes)
        with atomic_dir(out_dir) as tmp:
            write_splits(path, sep, scan.columns, kinds, p["target"], codes, tmp)
            write_json(tmp / "schema.json", schema)
        for col, n in moved.items():
            log(f"moved {n} rows to train: their {col!r} value appears nowhere else in train")
    log(f"prepared {source} ({engine}): " + ", ".join(f"{k} {v} rows" for k, v in schema["rows"].items())
        + f" → {out_dir}")
    return schema


def describe(p: dict, seed: int, kinds: dict, classes: list | None, codes_or_counts) -> dict:
    """schema.json: what the splits hold (both engines write the same one)."""
    counts = np.bincount(codes_or_counts, minlength=3) if isinstance(codes_or_counts, np.ndarray) else codes_or_counts
    return {
        "source": p["source"],
        "target": p["target"],
        "task": p["task"],
        "features": [{"name": c, "type": k} for c, k in kinds.items() if c != p["target"]],
        "classes": classes,
        "rows": {name: int(counts[i]) for i, name in enumerate(NAMES)},
        "params": {"seed": seed, "tabular.data": p},
    }


class Scan:
    """Pass 1 over the CSV: per column the stats typing needs, and per row the codes of
    columns with few distinct values (categories, classes) for the split."""

    def __init__(self, path: Path, sep: str, drop: list[str], target: str, max_categories: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.stats: dict[str, ColumnStats] = {}
        self.known: dict[str, "pa.Array"] = {}  # distinct values so far, in order of appearance
        self.codes: dict[str, list[np.ndarray]] = {}  # per batch, codes into known (NO_CODE: missing)
        self.rows = 0
        for line, cols in csv_batches(path, sep, drop):
            for col, v in cols.items():
                s = self.stats.setdefault(col, ColumnStats())
                if col not in self.known:
                    self.known[col], self.codes[col] = pa.array([], pa.string()), []
                valid = pc.is_valid(v)
                n_valid = pc.sum(valid).as_py() or 0
                s.present += n_valid
                if n_valid < len(v) and col == target:
                    s.missing += len(v) - n_valid
                    if len(s.missing_lines) < 5:
                        s.missing_lines += (line + np.flatnonzero(~valid.to_numpy(zero_copy_only=False))[:5]).tolist()
                n_bad = 0
                if s.bad or not numbers(v):  # the regex, slower, says which cells are text
                    bad = pc.and_(valid, pc.invert(pc.fill_null(pc.match_substring_regex(v, NUMBER_RE), False)))
                    n_bad = pc.sum(bad).as_py() or 0
                s.bad += n_bad
                if n_bad and len(s.bad_cells) < 5:
                    at = np.flatnonzero(bad.to_numpy(zero_copy_only=False))[:5]
                    s.bad_cells += [(int(line + i), v[int(i)].as_py()) for i in at]
                self._track(col, v, s, max_categories if col != target else None)
            self.rows += len(next(iter(cols.values()), []))
        if not self.rows:
            raise StageError(f"{path}: no data rows (only a header)")
        self.columns = list(self.stats)

    def _track(self, col: str, v, s: ColumnStats, cap: int | None) -> None:
        """Count distinct values; keep per-row codes while there are at most `cap` of them
        (None: always, for the classes). A column of numbers only stops counting past `cap`
        (its count matters only if text turns up later, and then "more than cap" is true)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        known = self.known.get(col)
        if known is None:
            return
        uniques = pc.drop_null(pc.unique(v))
        new = uniques.filter(pc.invert(pc.is_in(uniques, value_set=known)))
        known = pa.concat_arrays([known, new.cast(pa.string())]) if len(new) else known
        s.distinct = len(known)
        if self.codes.get(col) is not None and (cap is None or len(known) <= cap):
            idx = pc.index_in(v, value_set=known).to_numpy(zero_copy_only=False)
            self.codes[col].append(np.nan_to_num(idx, nan=NO_CODE).astype(np.int32 if cap is None else np.int16))
        else:
            self.codes[col] = None
        stop = len(known) > DISTINCT_CAP or (cap is not None and not s.bad and len(known) > cap)
        self.known[col] = None if stop else known
        s.counted_all = not stop

    def column_codes(self, col: str) -> tuple[np.ndarray, list] | None:
        parts = self.codes.get(col)
        if parts is None:
            return None
        return np.concatenate(parts) if parts else np.zeros(0, np.int16), self.known[col].to_pylist()


def plan(scan: Scan, p: dict, seed: int) -> tuple[dict, list | None, np.ndarray, dict]:
    """Types, classes and each row's split code; and how many rows each category column moved to train."""
    target, task = p["target"], p["task"]
    kinds = column_kinds(scan.stats, target, task, p["source"], p["max_categories"])
    if task == "classification":
        groups, labels = scan.column_codes(target)
        classes = sorted(labels)
        check_classes(classes, target, task, p["source"])
        counts = dict(zip(labels, np.bincount(groups, minlength=len(labels)).tolist()))
    else:
        groups, labels, classes = np.zeros(scan.rows, np.int32), [None], None
        counts = {None: scan.rows}
    val, test = p["split"]["val"], p["split"]["test"]
    q = quotas(counts, val, test, p["source"], target if task == "classification" else None)
    if p["split"].get("method", "hash") == "sklearn":
        codes = sklearn_assign(np.asarray(labels, dtype=object)[groups], task == "classification", val, test, seed,
                               p["source"])
    else:
        codes = hash_assign(row_hash(seed, np.arange(2, 2 + scan.rows)), groups, [q[g] for g in labels])
    return kinds, classes, *move_unseen_categories(codes, {c: scan.column_codes(c)[0] for c, k in kinds.items()
                                                           if k == "categorical" and c != target})


def move_unseen_categories(codes: np.ndarray, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Rows whose value in some category column has no row in train go to train. Decided on
    the split as drawn, for all columns at once (Spark does the same), then applied."""
    move = np.zeros(len(codes), bool)
    moved = {}
    for col, vc in columns.items():
        seen = np.zeros(int(vc.max(initial=0)) + 2, bool)
        seen[vc[(codes == TRAIN) & (vc != NO_CODE)]] = True
        unseen = (vc != NO_CODE) & ~seen[vc]
        if unseen.any():
            moved[col] = int(unseen.sum())
            move |= unseen
    codes = codes.copy()
    codes[move] = TRAIN
    return codes, moved


def write_splits(path: Path, sep: str, columns: list[str], kinds: dict, target: str, codes: np.ndarray,
                 out: Path) -> None:
    """Pass 2: typed record batches, each cut into the three splits, appended as row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = split_schema(kinds, target)
    text = [c for c, k in kinds.items() if k == "categorical"]
    writers = [pq.ParquetWriter(out / f"{name}.parquet", schema, use_dictionary=text) for name in NAMES]
    drop = [c for c in columns if c not in kinds]
    try:
        for line, cols in csv_batches(path, sep, drop):
            n = len(next(iter(cols.values())))
            arrays = [typed(cols[f.name], kinds[f.name]) for f in schema if f.name != "line"]
            table = pa.Table.from_arrays([*arrays, pa.array(np.arange(line, line + n))], schema=schema)
            part = codes[line - 2:line - 2 + n]
            for code, writer in zip((TRAIN, VAL, TEST), writers):
                writer.write_table(table.filter(pa.array(part == code)))
    finally:
        for w in writers:
            w.close()


def numbers(v) -> bool:
    """Whether every cell is a number: one cast, the common case for a numeric column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        pc.cast(v, pa.float64())
        return True
    except pa.ArrowInvalid:
        return False


def typed(v, kind: str):
    """A column of stripped strings (missing = null) as float64 or string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(v, pa.float64()) if kind == "numeric" else v.cast(pa.large_string())
