"""The tabular stages on Spark (`tabular.data.engine: spark`; docs/spark.md): prepare in
Spark SQL, the suite's profile, and infer with mapInPandas around the same predict(). The
typing rules, the hash split and the errors are the pandas engine's (stages/tabular/data.py,
stages/core/splits.py), computed as Spark expressions, so both engines give the same splits.

Splits are folders of parquet parts (`train.parquet/part-00000.parquet`, ...) with a `line`
column: the CSV line, which names failing rows in GX and rows in errors.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from stages.core.cli import StageError, log
from stages.core.documents import Columns
from stages.core.schema import TabularData
from stages.core.spark import session
from stages.core.splits import NAMES, quotas, row_hash_sql
from stages.tabular.data import (
    NULLS,
    NUMBER_RE,
    ColumnStats,
    check_classes,
    describe,
    describe_cells,
    not_readable,
    open_csv,
)

if TYPE_CHECKING:
    from stages.core.card import Card

PART_ROWS = 1_000_000  # rows per written parquet part


def read_lines(path: Path, sep: str, drop: list[str] = ()):
    """The CSV as stripped strings (missing cells null, as in data.csv_batches) with a `line`
    column numbered as the pandas engine numbers rows: record number + 1. Spark reads a file
    in byte-ordered partitions; monotonically_increasing_id() is (partition << 33) + row, so
    the line is the rows of earlier partitions plus the row within its own."""
    from pyspark.sql import functions as F

    spark = session()
    raw = spark.read.options(header=True, sep=sep, inferSchema=False, mode="FAILFAST").csv(
        str(path)
    )
    cols = []
    for name in raw.columns:
        if name.strip() in drop:
            continue
        v = F.regexp_replace(F.col(f"`{name}`"), r"^\s+|\s+$", "")
        cols.append(F.when(v.isin(NULLS), None).otherwise(v).alias(name.strip()))
    df = raw.select(
        *cols, F.spark_partition_id().alias("_pid"), F.monotonically_increasing_id().alias("_id")
    )
    try:
        counts = dict(df.groupBy("_pid").count().collect())
    except Exception as e:  # noqa: BLE001 - a malformed file: pandas names the line (not_readable)
        raise not_readable(path, sep, e) from None
    if not counts:
        raise StageError(f"{path}: no data rows (only a header)")
    offsets, total = {}, 0
    for pid in sorted(counts):
        offsets[pid], total = total, total + counts[pid]
    offset = F.create_map(*[F.lit(x) for pid, off in offsets.items() for x in (pid, off)])
    line = offset[F.col("_pid")] + (F.col("_id") - F.shiftleft(F.col("_pid").cast("long"), 33)) + 2
    return df.withColumn("line", line).drop("_pid", "_id"), total


def column_stats(df, columns: list[str], target: str) -> dict[str, ColumnStats]:
    """ColumnStats per column, as data.csv_batches + prepare.Scan gather them."""
    from pyspark.sql import functions as F

    bad = {c: F.col(f"`{c}`").isNotNull() & ~F.col(f"`{c}`").rlike(NUMBER_RE) for c in columns}
    aggs = [F.count(F.col(f"`{c}`")).alias(f"p{i}") for i, c in enumerate(columns)]
    aggs += [F.count(F.when(bad[c], 1)).alias(f"b{i}") for i, c in enumerate(columns)]
    aggs += [F.countDistinct(F.col(f"`{c}`")).alias(f"d{i}") for i, c in enumerate(columns)]
    aggs += (
        [F.count(F.when(F.col(f"`{target}`").isNull(), 1)).alias("missing")]
        if target in columns
        else []
    )
    row = df.agg(*aggs).first()
    stats = {}
    for i, c in enumerate(columns):
        s = ColumnStats(present=row[f"p{i}"], bad=row[f"b{i}"], distinct=row[f"d{i}"])
        if s.bad:
            s.bad_cells = [
                (r["line"], r["v"])
                for r in df.filter(bad[c])
                .select("line", F.col(f"`{c}`").alias("v"))
                .orderBy("line")
                .limit(5)
                .collect()
            ]
        stats[c] = s
    if target in columns and row["missing"]:
        t = stats[target]
        t.missing = row["missing"]
        t.missing_lines = [
            r["line"]
            for r in df.filter(F.col(f"`{target}`").isNull()).orderBy("line").limit(5).collect()
        ]
    return stats


def prepare(path: Path, sep: str, p: TabularData, seed: int, out: Path) -> dict:
    """prepare.run's work in Spark SQL: returns columns.json's content, writes the splits into `out`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from stages.tabular.roles import decide, read_sample

    target = p.target
    df, _ = read_lines(path, sep)
    columns = [c for c in df.columns if c != "line"]
    stats = column_stats(df, columns, target)
    roles = decide(stats, read_sample(path, sep), p, p.source)
    task, types = roles.task, roles.types
    missing = stats[target].missing if target in stats else 0
    df = df.filter(F.col(f"`{target}`").isNotNull()).select(
        *[
            # try_cast: a word in a number column is missing, as pandas reads it (roles.py)
            F.col(f"`{c}`").try_cast("double").alias(c) if k == "numeric" else F.col(f"`{c}`")
            for c, k in types.items()
        ],
        "line",
    )
    if task == "classification":
        counts = dict(df.groupBy(f"`{target}`").count().collect())
        classes = sorted(counts)
        check_classes(classes, target, task, p.source)
        group = F.col(f"`{target}`")
        if min(counts.values()) < 2:  # as prepare.stratify_or_not
            log(
                f"warning: {p.source}: a class of {target!r} has 1 row: the split is not stratified"
            )
            counts, group = {None: sum(counts.values())}, F.lit(None).cast("string")
    else:
        counts, classes, group = {None: df.count()}, None, F.lit(None).cast("string")
    q = quotas(
        counts,
        p.split.val,
        p.split.test,
        p.source,
        target if len(counts) > 1 else None,
        max(5, len(classes or [])),
    )
    df = assign_splits(df, group, q, seed)
    # Rows whose category has no row in train go to train (prepare.move_unseen_categories):
    # decided on the split as drawn, for all columns at once.
    unseen = [
        F.col(f"`{c}`").isNotNull()
        & (F.max((F.col("_split") == 0).cast("int")).over(Window.partitionBy(f"`{c}`")) == 0)
        for c, k in types.items()
        if k == "categorical" and c != target
    ]
    if unseen:
        df = df.withColumn("_split", F.when(_any(unseen), 0).otherwise(F.col("_split")))
    if p.exclude_lines:  # after the split is drawn, as prepare.run (tabular/labels.py)
        df = df.filter(~F.col("line").isin([int(x) for x in p.exclude_lines]))
    df = df.persist()
    sizes = dict(df.groupBy("_split").count().collect())
    rows = [sizes.get(i, 0) for i in range(3)]
    for code, name in enumerate(NAMES):
        part = df.filter(F.col("_split") == code).drop("_split")
        write_parts(part, rows[code], out / f"{name}.parquet", "parquet")
    df.unpersist()
    schema = describe(p, seed, dict(types), classes, rows, roles, int(missing))
    return schema, roles


def assign_splits(df, group, q: dict, seed: int):
    """A `_split` column (0 train, 1 val, 2 test) by the quotas q of each group."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # Rank within each group by (hash, line); the first n_test rows go to test, the next n_val to val.
    rank = F.row_number().over(
        Window.partitionBy(group).orderBy(F.expr(row_hash_sql(seed)), "line")
    )
    n_test = (
        F.create_map(*[F.lit(x) for g, (t, _) in q.items() if g is not None for x in (g, t)])
        if None not in q
        else None
    )
    n_val = (
        F.create_map(*[F.lit(x) for g, (_, v) in q.items() if g is not None for x in (g, v)])
        if None not in q
        else None
    )
    t = n_test[group] if None not in q else F.lit(q[None][0])
    v = n_val[group] if None not in q else F.lit(q[None][1])
    df = df.withColumn("_split", F.when(rank <= t, 2).when(rank <= t + v, 1).otherwise(0))
    return df


def _any(conditions):
    out = conditions[0]
    for c in conditions[1:]:
        out = out | c
    return out


def write_parts(df, rows: int, out: Path, fmt: str) -> None:
    """Write a Spark DataFrame as a folder of parts named part-00000.<fmt>, ... : rows in line
    order within each part, and nothing random in names or content (Spark's own part names
    carry a random id; its _SUCCESS and .crc files are dropped), so outputs reproduce byte for byte."""
    from pyspark.sql import functions as F

    n = max(1, math.ceil(rows / PART_ROWS))
    tmp = out.parent / f".{out.name}.spark"
    writer = (
        df.repartition(n, F.floor((F.col("line") - 2) / PART_ROWS))
        .sortWithinPartitions("line")
        .write
    )
    if fmt == "csv":
        writer.options(header=True).csv(str(tmp))
    else:
        writer.parquet(str(tmp))
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(tmp.glob(f"part-*.{fmt}"))):
        f.rename(out / f"part-{i:05d}.{fmt}")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


def profile(paths: list[Path] | Path, schema: Columns) -> dict:
    """validate.profile on Spark: per feature rows, nulls, min, max, sorted values."""
    from pyspark.sql import functions as F

    paths = [paths] if isinstance(paths, str | Path) else paths
    df = session().read.parquet(*map(str, paths))
    aggs = [F.count(F.lit(1)).alias("rows")]
    for i, f in enumerate(schema.features):
        c = F.col(f"`{f.name}`")
        aggs += [F.count(F.when(c.isNull(), 1)).alias(f"n{i}")]
        aggs += (
            [F.min(c).alias(f"lo{i}"), F.max(c).alias(f"hi{i}")]
            if f.type == "numeric"
            else [
                F.sort_array(F.collect_set(c if f.type == "categorical" else None)).alias(f"v{i}")
            ]
        )
    row = df.agg(*aggs).first()
    return {
        f.name: {
            "rows": row["rows"],
            "nulls": row[f"n{i}"],
            "min": row[f"lo{i}"] if f.type == "numeric" else None,
            "max": row[f"hi{i}"] if f.type == "numeric" else None,
            "values": list(row[f"v{i}"]) if f.type == "categorical" else None,
        }
        for i, f in enumerate(schema.features)
    }


def read_features(source: str, features: list[dict]):
    """data.read_features on Spark: a Spark DataFrame with the features typed and a `line`
    column; the same errors."""
    from pyspark.sql import functions as F

    path = Path(source)
    if path.suffix == ".parquet":
        if not path.exists():
            raise StageError(f"{path}: no such file")
        df = session().read.parquet(str(path))
        rows = df.count()
    else:
        df, rows = read_lines(*open_csv(path))
    missing = [f.name for f in features if f.name not in df.columns]
    if missing:
        raise StageError(f"{source}: missing feature columns: {', '.join(missing)}")
    if not rows:
        raise StageError(f"{source}: no rows to predict")
    for f in features:
        c = F.col(f"`{f.name}`")
        if f.type != "numeric" or dict(df.dtypes)[f.name] != "string":
            continue
        bad = df.filter(c.isNotNull() & ~c.rlike(NUMBER_RE))
        n = bad.count()
        if n:
            first = bad.orderBy("line").select("line", c.alias("v")).limit(5).collect()
            cells = pd.Series(
                [r["v"] for r in first], index=[r["line"] for r in first], dtype=object
            )
            raise StageError(
                f"{source}: column {f.name!r} must be numeric but has text in {n} rows "
                f"({describe_cells(cells, count=n)})"
            )
        df = df.withColumn(f.name, c.cast("double"))
    return df


def infer(
    card: Card,
    onnx_path: Path,
    suite: dict,
    source: str,
    suite_file: str,
    batch_size: int,
    out: Path,
    fmt: str,
    predict,
) -> tuple[dict, float]:
    """infer.run on Spark: GX on the Spark DataFrame, then `predict` (infer.predict, passed
    in so that this module never imports infer.py, which imports it) on each partition's pandas
    batches (mapInPandas), one onnxruntime session per task (the model file shipped with
    addFile), written as a folder of `fmt` (csv or parquet) parts. Returns ({rows}, seconds)."""
    from pyspark import SparkFiles
    from pyspark.sql import types as T

    from stages.core.expectations import run_suite, summarise
    from stages.core.inference import open_session

    spark = session()
    df = read_features(source, card.features)
    df = df.drop(card.target) if card.target in df.columns else df
    report = run_suite(suite, {"input": df})
    if not report["success"]:
        raise StageError(
            f"{source} does not meet the expectations in {suite_file} (target checks excluded)\n"
            + summarise(report, {"input": f"{source}, rows numbered by CSV line"})
        )
    spark.sparkContext.addFile(str(onnx_path))
    name = Path(onnx_path).name
    fields = [T.StructField("line", T.LongType())]
    if card.kind == "classification":
        fields += [
            T.StructField("prediction", T.StringType()),
            T.StructField("probability", T.FloatType()),
        ]
        fields += [T.StructField(f"p_{c}", T.FloatType()) for c in card.classes]
    else:
        fields += [T.StructField("prediction", T.FloatType())]

    def predict_partition(batches):
        session_ = open_session(
            SparkFiles.get(name), threads=1
        )  # one per task; tasks run side by side
        for pdf in batches:
            table = predict(card, session_, pdf.set_index("line"), source, batch_size)
            table.insert(0, "line", pdf["line"].to_numpy())
            yield table

    start = time.perf_counter()
    preds = df.mapInPandas(predict_partition, T.StructType(fields))
    rows = df.count()
    write_parts(preds, rows, out, fmt)
    return {"rows": rows}, time.perf_counter() - start
