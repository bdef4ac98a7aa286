"""prepare: any CSV → typed train/val/test parquet splits + columns.json in data/prepared/tabular/.

    python -m stages prepare tabular

Two engines, `tabular.data.engine`, giving the same splits row for row:
- `pandas` (the default; the name says "one machine"): streams the CSV with pyarrow, never
  holding the table. pyarrow rather than DuckDB or Polars: it is already installed (pandas
  reads parquet through it), its CSV reader streams record batches of a fixed byte size, and
  its compute kernels (cast, dictionary encode, regex match) type a column without Python
  loops. Pass 1 parses the CSV, gathers what typing and splitting need (counts, the first
  bad cells, category codes) and spills only the float64 cast of each batch's numbers (the
  cast typing needed anyway) to an LZ4 Arrow IPC file beside the output, about a third of
  the CSV's size until the stage ends; categories need no spill, their codes are the column.
  Pass 2 writes the numbers and the categories (arrow dictionaries of their codes) as typed
  row groups into train.parquet, val.parquet and test.parquet, the CSV line as the (pandas)
  index. 5M rows (210 MiB) in about 4 s on 2 cores (docs/benchmarks.md).
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

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from stages.core import layout
from stages.core.cli import StageError, log
from stages.core.documents import Columns
from stages.core.files import atomic_dir
from stages.core.inference import physical_cores
from stages.core.schema import Params, TabularData
from stages.core.splits import (
    NAMES,
    TEST,
    TRAIN,
    VAL,
    hash_assign,
    quotas,
    row_hash,
    sklearn_assign,
)
from stages.tabular.data import (
    DISTINCT_CAP,
    NUMBER_RE,
    ColumnStats,
    check_classes,
    csv_batches,
    csv_header,
    describe,
    open_csv,
    split_schema,
)
from stages.tabular.labels import exclude
from stages.tabular.roles import decide, read_sample
from stages.tabular.roles import table as role_table

NO_CODE = -1  # a missing cell, or a column whose values are no longer tracked
DROPPED = 3  # a row's split code when its target is missing: written to no split
STRINGS = ("text", "datetime")  # column types kept as the user's strings in the splits


def run(params: Params, out_dir: str | Path = layout.prepared("tabular")) -> Columns:
    p = params.tabular.data
    engine, method = p.engine, p.split.method  # the schema allows each value
    if engine == "spark" and method != "hash":
        raise StageError(
            f"tabular.data.split.method is {method!r}; choose hash (the only split Spark computes)"
        )
    source = p.source
    path, sep = open_csv(source)
    if engine == "spark":
        from stages.tabular.spark import prepare as spark_prepare

        with atomic_dir(out_dir) as tmp:
            schema, roles = spark_prepare(path, sep, p, params.seed, tmp)
            schema.write(tmp / layout.columns("tabular").name)
    else:
        with atomic_dir(out_dir) as tmp:
            spill = tmp / "rows.arrow"
            scan = Scan(path, sep, [], p.target, p.max_categories, spill)
            # Arrow's allocator keeps pass 1's freed blocks; handed back, the split's arrays
            # (about 25 bytes a row) don't stack on them: a peak of 2.7x the CSV, not 2.7-3.3x.
            import pyarrow as pa

            pa.default_memory_pool().release_unused()
            roles = decide(scan.stats, read_sample(path, sep), p, source)
            types, classes, codes, moved = plan(scan, p, params.seed, roles)
            codes = exclude(codes, p.exclude_lines, source)  # reviewed rows: in no split
            missing = scan.stats[p.target].missing
            schema = describe(p, params.seed, types, classes, codes, roles, missing)
            texts = {c: scan.column_codes(c) for c, k in types.items() if k == "categorical"}
            strings = read_columns(path, sep, [c for c, k in types.items() if k in STRINGS])
            write_splits(spill, types, p.target, codes, texts, tmp, strings)
            spill.unlink()
            schema.write(tmp / layout.columns("tabular").name)
        for col, n in moved.items():
            log(f"moved {n} rows to train: their {col!r} value appears nowhere else in train")
    report_roles(roles, schema, p)
    log(
        f"prepared {source} ({engine}): "
        + ", ".join(f"{k} {v} rows" for k, v in schema.rows.items())
        + f" → {out_dir}"
    )
    return schema


def report_roles(roles, schema: Columns, p: TabularData) -> None:
    """The task, the roles table and the rows dropped for a missing target, logged; schema.json
    keeps them (`columns`), and evaluate copies them into metrics.json."""
    log(f"task: {roles.task} ({roles.task_why})\n{role_table(roles)}")
    missing = (schema.dropped_rows or {}).get("missing_target", 0)
    if missing:
        log(f"dropped {missing} rows whose target {p.target!r} is missing")


def read_columns(path: Path, sep: str, columns: list[str]) -> dict:
    """Text and date columns as whole arrow string columns (a second read of the CSV, only
    for them): pass 1 spills numbers only, and codes stop past max_categories."""
    if not columns:
        return {}
    import pyarrow as pa

    header = [h.strip() for h in csv_header(path, sep)]
    parts = {c: [] for c in columns}
    for _, cols in csv_batches(path, sep, [h for h in header if h not in columns]):
        for c in columns:
            parts[c].append(cols[c])
    return {c: pa.chunked_array(v, pa.string()).combine_chunks() for c, v in parts.items()}


class Scan:
    """Pass 1 over the CSV: per column the stats typing needs, and per row the codes of
    columns with few distinct values (categories, classes) for the split."""

    def __init__(
        self, path: Path, sep: str, drop: list[str], target: str, max_categories: int, spill: Path
    ):
        import pyarrow as pa

        self.stats: dict[str, ColumnStats] = {}
        self.known: dict[str, pa.Array] = {}  # distinct values so far, in order of appearance
        self.codes: dict[
            str, list[np.ndarray]
        ] = {}  # per batch, codes into known (NO_CODE: missing)
        self.rows = 0
        self.target_missing: list[np.ndarray] = []  # per batch, rows whose target is missing
        with contextlib.ExitStack() as stack:
            writer, pool = None, stack.enter_context(ThreadPoolExecutor(physical_cores()))
            for line, cols in csv_batches(path, sep, drop):
                for col in cols:
                    if col not in self.stats:
                        self.stats[col], self.known[col], self.codes[col] = (
                            ColumnStats(),
                            pa_empty(),
                            [],
                        )
                # Columns in parallel (each touches only its own stats; arrow releases the GIL).
                cast = pool.map(
                    lambda col, v, line=line: self._scan(
                        line, col, v, max_categories if col != target else None, col == target
                    ),
                    *zip(*cols.items(), strict=False),
                )
                n = len(next(iter(cols.values())))
                self.rows += n
                # Only numbers are spilled: a column that ends numeric had every batch cast
                # (the cast pass 1 needed anyway), and one that ends categorical is rebuilt from
                # its codes. A batch of text leaves its column's number field null.
                batch = pa.RecordBatch.from_arrays(
                    [f if f is not None else pa.nulls(n, pa.float64()) for f in cast],
                    names=list(cols),
                )
                if writer is None:
                    # LZ4: the null fields of text columns cost nothing on disk.
                    options = pa.ipc.IpcWriteOptions(compression="lz4")
                    writer = stack.enter_context(
                        pa.ipc.new_stream(str(spill), batch.schema, options=options)
                    )
                writer.write_batch(batch)
        if not self.rows:
            raise StageError(f"{path}: no data rows (only a header)")
        self.columns = list(self.stats)

    def _scan(self, line: int, col: str, v, cap: int | None, target: bool):
        """One batch's cells of a column into its stats and codes; returns them as float64
        with any text cells null (all null for a column of text). Text is looked at per distinct value (a dictionary
        encoding: one hash pass), not per cell: a category has a handful of values in a
        million cells."""
        import pyarrow as pa
        import pyarrow.compute as pc

        s = self.stats[col]
        s.present += len(v) - v.null_count
        if target:
            self.target_missing.append(v.is_null().to_numpy(zero_copy_only=False))
        if v.null_count and target:
            s.missing += v.null_count
            if len(s.missing_lines) < 5:
                s.missing_lines += (
                    line + np.flatnonzero(v.is_null().to_numpy(zero_copy_only=False))[:5]
                ).tolist()
        floats = as_numbers(v) if not s.bad else None
        if floats is not None and self.known[col] is None:
            return floats  # a column of numbers with too many values to be a category: nothing to count
        enc = pc.dictionary_encode(v)
        values = enc.dictionary
        rows = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)  # -1: missing
        if floats is None:  # text: which values (so which cells) are not numbers
            number = pc.fill_null(pc.match_substring_regex(values, NUMBER_RE), False)
            bad = np.append(~number.to_numpy(zero_copy_only=False), False)[rows]
            # The numbers among them, words null: what a column of numbers with a few words
            # (roles.mostly_numbers) keeps.
            floats = pc.cast(pc.if_else(number, values, None), pa.float64()).take(enc.indices)
            n_bad = int(bad.sum())
            s.bad += n_bad
            if n_bad and len(s.bad_cells) < 5:
                s.bad_cells += [
                    (int(line + i), values[int(rows[i])].as_py()) for i in np.flatnonzero(bad)[:5]
                ]
        self._track(col, values, rows, s, cap)
        return floats

    def _track(self, col: str, values, rows: np.ndarray, s: ColumnStats, cap: int | None) -> None:
        """Count distinct values; keep per-row codes while there are at most `cap` of them
        (None: always, for the classes). A column of numbers only stops counting past `cap`
        (its count matters only if text turns up later, and then "more than cap" is true).
        `values` are the batch's distinct values, `rows` each row's index into them (-1: missing)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        known = self.known.get(col)
        if known is None:
            return
        new = values.filter(pc.invert(pc.is_in(values, value_set=known)))
        known = pa.concat_arrays([known, new.cast(pa.string())]) if len(new) else known
        s.distinct = len(known)
        if self.codes.get(col) is not None and (cap is None or len(known) <= cap):
            where = pc.index_in(values, value_set=known).to_numpy(zero_copy_only=False)
            self.codes[col].append(
                np.append(where, NO_CODE)[rows].astype(np.int32 if cap is None else np.int16)
            )
        else:
            self.codes[col] = None
        stop = len(known) > DISTINCT_CAP or (cap is not None and not s.bad and len(known) > cap)
        self.known[col] = None if stop else known
        s.counted_all = not stop

    def column_codes(self, col: str) -> tuple[np.ndarray, list] | None:
        parts = self.codes.get(col)
        if parts is None:
            return None
        return np.concatenate(parts) if parts else np.zeros(0, np.int16), self.known[
            col
        ].to_pylist()


def plan(
    scan: Scan, p: TabularData, seed: int, roles
) -> tuple[dict, list | None, np.ndarray, dict]:
    """Types, classes and each row's split code (DROPPED: no target); and how many rows each
    category column moved to train."""
    target, task = p.target, roles.task
    types = roles.types
    keep = ~np.concatenate(scan.target_missing) if scan.target_missing else np.ones(0, bool)
    if task == "classification":
        if scan.column_codes(target) is None:
            raise StageError(
                f"{p.source}: target {target!r} has more than {DISTINCT_CAP} distinct values: "
                "too many classes; set tabular.data.task: regression if it is a number"
            )
        groups, labels = scan.column_codes(target)
        groups = groups[keep]
        classes = sorted(labels)
        check_classes(classes, target, task, p.source)
        counts = dict(
            zip(labels, np.bincount(groups, minlength=len(labels)).tolist(), strict=False)
        )
        counts, groups, labels = stratify_or_not(counts, groups, labels, target, p.source)
    else:
        groups, labels, classes = np.zeros(int(keep.sum()), np.int32), [None], None
        counts = {None: int(keep.sum())}
    val, test = p.split.val, p.split.test
    at_least = max(5, len(classes or []))
    q = quotas(counts, val, test, p.source, target if len(counts) > 1 else None, at_least)
    lines = np.arange(2, 2 + scan.rows)[keep]
    if p.split.method == "sklearn":
        kept = sklearn_assign(
            np.asarray(labels, dtype=object)[groups], len(counts) > 1, val, test, seed, p.source
        )
    else:
        kept = hash_assign(row_hash(seed, lines), groups, [q[g] for g in labels])
    codes = np.full(scan.rows, DROPPED, np.uint8)
    codes[keep] = kept
    columns = {
        c: scan.column_codes(c)[0] for c, k in types.items() if k == "categorical" and c != target
    }
    return (types, classes, *move_unseen_categories(codes, columns))


def stratify_or_not(counts: dict, groups: np.ndarray, labels: list, target: str, source: str):
    """Classes to stratify on, or one group with a warning when a class is too small."""
    if min(counts.values()) >= 2:
        return counts, groups, labels
    small = min(counts, key=lambda c: (counts[c], str(c)))
    log(
        f"warning: {source}: class {small!r} of {target!r} has {counts[small]} row(s): "
        "the split is not stratified"
    )
    return {None: int(sum(counts.values()))}, np.zeros(len(groups), np.int32), [None]


def move_unseen_categories(
    codes: np.ndarray, columns: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict]:
    """Rows whose value in some category column has no row in train go to train. Decided on
    the split as drawn, for all columns at once (Spark does the same), then applied."""
    move = np.zeros(len(codes), bool)
    moved = {}
    for col, vc in columns.items():
        seen = np.zeros(int(vc.max(initial=0)) + 2, bool)
        seen[vc[(codes == TRAIN) & (vc != NO_CODE)]] = True
        unseen = (vc != NO_CODE) & ~seen[vc] & (codes != DROPPED)
        if unseen.any():
            moved[col] = int(unseen.sum())
            move |= unseen
    for split in (VAL, TEST):  # never a whole split: its unseen values are read as unknown
        if (codes == split).any() and move[codes == split].all():
            move[codes == split] = False
    codes = codes.copy()
    codes[move] = TRAIN
    return codes, moved


def write_splits(spill: Path, types, target, codes, texts: dict, out: Path, strings=None) -> None:
    """Pass 2: the spilled numbers and the categories' codes, typed, each batch cut into the
    three splits and appended as row groups. `texts`: {column: (codes per row, values)};
    `strings`: {column: whole string array} (text and date columns)."""
    strings = strings or {}
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = split_schema(types, target)
    values = {c: pa.array(v, pa.string()) for c, (_, v) in texts.items()}
    # Categories go in as arrow dictionaries, which parquet stores as its own dictionary
    # encoding without hashing each cell (the costliest part of the pass before). Without the
    # arrow schema (which would say "dictionary") they read back as plain text; the pandas
    # metadata (the line as the index) is added by hand. Statistics are kept for numbers only
    # (a string's min/max is costly and no reader prunes on them); the line, counting up, is
    # delta-encoded (35x smaller).
    fields = [
        pa.field(f.name, pa.dictionary(pa.int32(), pa.string())) if f.name in texts else f
        for f in schema
    ]
    writers = [
        pq.ParquetWriter(
            out / f"{name}.parquet",
            pa.schema(fields),
            use_dictionary=list(texts),
            store_schema=False,
            write_statistics=[f.name for f in schema if f.name not in texts],
            column_encoding={"line": "DELTA_BINARY_PACKED"},
        )
        for name in NAMES
    ]

    def part(code: int, batch, start: int):
        """The batch's rows in split `code` (rows picked first: filtering built text copies it)."""
        rows = np.flatnonzero(codes[start : start + batch.num_rows] == code)
        arrays = [
            dictionary(texts[f.name][0][start + rows], values[f.name])
            if f.name in texts
            else strings[f.name].take(pa.array(start + rows))
            if f.name in strings
            else batch.column(f.name).take(rows)
            for f in fields
            if f.name != "line"
        ]
        return pa.Table.from_arrays([*arrays, pa.array(rows + start + 2)], schema=pa.schema(fields))

    def append(writer, table, before) -> None:
        if before is not None:
            before.result()  # row groups in order: the previous batch's part of this split first
        writer.write_table(table.result())

    start = 0  # the batch's first row (CSV line - 2)
    try:
        # Read, not memory-mapped: mapped pages would count as this process's memory. Parts are
        # built and encoded in threads (arrow and parquet release the GIL), one batch ahead:
        # train's encoding, two thirds of the pass, overlaps the next batch's work.
        with pa.ipc.open_stream(pa.OSFile(str(spill))) as reader, ThreadPoolExecutor(4) as pool:
            last, older = [None] * 3, [None] * 3  # the appends of the previous two batches
            for batch in reader:
                wait(older)  # at most two batches in memory
                tables = [pool.submit(part, code, batch, start) for code in (TRAIN, VAL, TEST)]
                older, last = (
                    last,
                    [
                        pool.submit(append, w, t, f)
                        for w, t, f in zip(writers, tables, last, strict=False)
                    ],
                )
                start += batch.num_rows
            wait(last)
    finally:
        for w in writers:
            w.add_key_value_metadata({"pandas": schema.metadata[b"pandas"]})
            w.close()


def wait(futures: list) -> None:
    for f in futures:
        if f is not None:
            f.result()


def dictionary(codes: np.ndarray, values):
    """A category column's rows from their codes (NO_CODE: missing) as an arrow dictionary."""
    import pyarrow as pa

    missing = codes == NO_CODE
    return pa.DictionaryArray.from_arrays(
        pa.array(codes.astype(np.int32), mask=missing if missing.any() else None), values
    )


def pa_empty():
    import pyarrow as pa

    return pa.array([], pa.string())


def as_numbers(v):
    """The cells as float64 when every one is a number (one cast, the common case for a
    numeric column), else None. A failing cast costs 20x a successful one (0.38 s per
    million cells): the first cells tell a text column without it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        pc.cast(v.slice(0, 64), pa.float64())
        return pc.cast(v, pa.float64())
    except pa.ArrowInvalid:
        return None
