"""infer: batch predictions with onnxruntime, and the serving hook the app calls. Imports no torch.

    python -m stages infer tabular   # CSV/parquet, checked by the GX suite (no target checks)
                                     # → data/predictions/tabular.csv

The input is read, checked and predicted in chunks (a file larger than memory streams
through); run(out=....parquet) writes parquet instead of CSV. With `tabular.data.engine:
spark` the same runs on Spark (mapInPandas around predict(); docs/spark.md) and the output is
a folder of CSV parts. Also writes metrics/tabular/infer.json with its throughput.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import layout
from stages.core.card import Card, read_card
from stages.core.cli import StageError, log
from stages.core.expectations import for_inference, load_suite, run_suite_aside, summarise
from stages.core.files import atomic_dir, atomic_path, write_json, write_timing
from stages.core.inference import open_session, run_all
from stages.core.schema import Params
from stages.core.trust import apply, ood_vectors, with_trust
from stages.tabular.data import Preprocessor, feature_chunks, scores, scores_table
from stages.tabular.explain import attribution_columns

CHUNK_ROWS = 1_000_000


def predict(
    card: Card, session, df: pd.DataFrame, source: str = "input", batch_size: int = 4096
) -> pd.DataFrame:
    """Typed feature rows → the predictions table: class and per-class probabilities, or the
    value. The app and Spark call this, `infer` the scores under it, so they answer alike."""
    return scores_table(predict_scores(card, session, df, source, batch_size), card)


def predict_scores(
    card: Card, session, df: pd.DataFrame, source: str = "input", batch_size: int = 4096
) -> np.ndarray:
    """Typed feature rows → their scores (stages.tabular.data.scores)."""
    return predict_outputs(card, session, df, source, batch_size)[0]


def predict_outputs(
    card: Card, session, df: pd.DataFrame, source: str = "input", batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray | None, list[list[str]]]:
    """(scores, what the card's OOD score reads (ood_vectors), or None for a card without
    trust, the warnings per row): a value the model has not seen is read as missing or
    unknown, and said (Preprocessor.screen, the rule the app applies too)."""
    pre = Preprocessor.from_dict(card.preprocessing)
    df, warnings = pre.screen(df)
    x = pre.transform(df, source)
    outputs = run_all(session, x, batch_size)
    if not np.isfinite(outputs[0]).all():
        raise StageError(
            f"{source}: some values are so far out of range that the model gives no finite prediction"
        )
    return scores(outputs[0], card), ood_vectors(card, x, outputs), warnings


def predict_records(card: Card, session, df: pd.DataFrame, source: str = "input") -> list[dict]:
    """predict() as dicts, with the trust fields (prediction_set or interval, ood): the app's
    pandas path."""
    s, feats, warnings = predict_outputs(card, session, df, source)
    records = with_trust(card, scores_table(s, card).to_dict("records"), s, feats)
    return [{**r, "warnings": w} for r, w in zip(records, warnings, strict=True)]


def input_frames(source: str, features: list[dict], target: str):
    """The input in chunks of typed features, any target column dropped: what `infer`
    predicts, and what its validation worker reads for itself."""
    for df in feature_chunks(source, features, CHUNK_ROWS):
        yield df.drop(columns=[target], errors="ignore")


# "0.00" to "1.00", and "0000" to "9999", each as the four bytes of one uint32
_HEADS = np.frombuffer(
    "".join(f"{i // 100}.{i % 100:02d}" for i in range(101)).encode(), dtype=np.uint32
)
_TAILS = np.frombuffer("".join(f"{i:04d}" for i in range(10_000)).encode(), dtype=np.uint32)


def six_decimals(p: np.ndarray) -> np.ndarray:
    """Probabilities as text with six decimals (0.052711), the eight bytes of each row made
    of two table look-ups: arrow spends about 100 ns formatting a float, 40 ms of `infer`'s
    time on 100,000 rows of three classes (`make bench`), as long as the bare loop's preprocessing."""
    q = np.clip(p, 0, 1) * 1e6
    q = np.rint(q, out=q).astype(np.int32)
    words = np.empty((len(q), 2), dtype=np.uint32)
    np.take(_HEADS, q // 10_000, out=words[:, 0])
    np.take(_TAILS, q % 10_000, out=words[:, 1])
    return words.view(np.uint8)


def csv_field(text: str) -> str:
    """A CSV field as RFC 4180 wants it: quoted only when it holds a comma, quote or newline."""
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\r\n') else text


def trust_columns(card: Card, predicted: np.ndarray, feats, csv: bool) -> list[tuple]:
    """The trust fields as (name, arrow array) columns: prediction_set (a JSON list in CSV,
    a list column in parquet) or interval_low / interval_high, then ood_flagged and
    ood_p_value; [] for a card without trust."""
    import json

    import pyarrow as pa

    if card.trust is None or feats is None:
        return []
    a = apply(card.trust, predicted, feats)
    if "sets" in a:
        classes = card.classes
        sets = [[classes[j] for j in np.flatnonzero(row)] for row in a["sets"]]
        first = [
            ("prediction_set", pa.array([csv_field(json.dumps(x)) for x in sets] if csv else sets))
        ]
    else:
        first = [
            (f"interval_{k}", pa.array(a["intervals"][:, i].astype(np.float32)))
            for i, k in enumerate(["low", "high"])
        ]
    flags = pa.array(["true" if f else "false" for f in a["flagged"]] if csv else a["flagged"])
    return [
        *first,
        ("ood_flagged", flags),
        ("ood_p_value", pa.array(a["p_value"].astype(np.float32))),
    ]


class Writer:
    """Appends chunks of scores (stages.tabular.data.scores) to a CSV or a parquet file (by
    the suffix) as predict()'s table, the line first. Parquet keeps numbers as float32, what
    the model computes in. The CSV has probabilities with six decimals, values at float32's
    shortest repr, and text quoted only where needed; its rows are put together by numpy and
    arrow's string kernels (arrow's CSV writer quotes every text field, and took 55 ms on
    100,000 rows against 17 for this; `make bench`). Written from the scores, not the
    table: building the table was 16 ms more (15% of the bare loop)."""

    def __init__(self, path: Path, card: Card):
        self.path, self.card, self.out = path, card, None

    def write(
        self, predicted: np.ndarray, lines: np.ndarray, feats=None, warnings=None, also=()
    ) -> None:
        """also: more (name, arrow array) columns, after the others (attributions)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        csv, classes = self.path.suffix != ".parquet", self.card.classes
        names = ["prediction", *(["probability", *(f"p_{c}" for c in classes)] if classes else [])]
        extra = trust_columns(self.card, predicted, feats, csv)
        texts = ["; ".join(w) for w in warnings or [[]] * len(predicted)]
        extra.append(("warnings", pa.array([csv_field(t) for t in texts] if csv else texts)))
        extra += list(also)
        names += [n for n, _ in extra]
        if classes:  # as scores_table: the first most probable class, and its probability
            best = predicted.argmax(axis=1)
            labels = pa.array([csv_field(c) if csv else c for c in classes]).take(pa.array(best))
            numbers = [np.take_along_axis(predicted, best[:, None], axis=1)[:, 0], *predicted.T]
        else:
            numbers = [predicted[:, 0]]
        if not csv:
            cols = [pa.array(v.astype(np.float32)) for v in numbers]
            chunk = pa.table(
                [pa.array(lines), *([labels] if classes else []), *cols, *(a for _, a in extra)],
                names=["line", *names],
            )
            self.out = self.out or pq.ParquetWriter(self.path, chunk.schema)
            self.out.write_table(chunk)
            return
        if self.out is None:
            self.out = open(self.path, "wb")  # noqa: SIM115 (closed by close(), after the last chunk)
            self.out.write((",".join(csv_field(c) for c in ["line", *names]) + "\n").encode())
        line = pc.cast(pa.array(lines), pa.string())
        if classes:  # the probabilities and the newline as one fixed-width text per row
            text = np.empty((len(predicted), 9 * len(numbers)), dtype=np.uint8)
            for j, v in enumerate(numbers):
                text[:, 9 * j : 9 * j + 8] = six_decimals(v)
            text[:, 8::9] = ord(",")
            text[:, -1] = ord("," if extra else "\n")
            width = text.shape[1]
            tail = pa.StringArray.from_buffers(
                len(text),
                pa.py_buffer(np.arange(0, width * len(text) + 1, width, dtype=np.int32)),
                pa.py_buffer(text),
            )
            rows = pc.binary_join_element_wise(line, labels, tail, ",")
        else:
            value = pc.cast(pa.array(numbers[0].astype(np.float32)), pa.string())
            rows = pc.binary_join_element_wise(line, value, ",")
            rows = pc.binary_join_element_wise(rows, "", "," if extra else "\n")
        if extra:  # the trust columns, then the newline
            texts = [pc.cast(a, pa.string()) for _, a in extra]
            rows = pc.binary_join_element_wise(rows, pc.binary_join_element_wise(*texts, ","), "")
            rows = pc.binary_join_element_wise(rows, "", "\n")
        offsets = np.frombuffer(
            rows.buffers()[1], dtype=np.int32, count=len(rows) + 1, offset=rows.offset * 4
        )
        self.out.write(memoryview(rows.buffers()[2])[offsets[0] : offsets[-1]])

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


# Expectations a batch to predict on cannot do without: its columns, and their types. The
# others judge values row by row; in a batch to predict on, such a row is predicted with a
# warning (Preprocessor.screen), never a reason to refuse the batch.
WHOLE_BATCH = ("expect_table_columns_to_match_set", "expect_column_values_to_be_in_type_list")


def judge(report: dict, source: str, suite_file: str) -> None:
    """Stop only when the batch as a whole is unusable; log the row-level failures, each with
    the share a batch of its size explains (a `mostly` share is judged on a sample: three
    standard errors of a binomial share)."""
    if report["success"]:
        return
    whole = {
        name: {**t, "results": [r for r in t["results"] if unusable(r)]}
        for name, t in report["tables"].items()
    }
    if any(t["results"] for t in whole.values()):
        # Rows are numbered by CSV line ("row 5" is line 5, not the fifth data row): say so.
        raise StageError(
            f"{source} does not meet the expectations in {suite_file} (target checks excluded)\n"
            + summarise({**report, "tables": whole}, {"input": f"{source}, rows by CSV line"})
        )
    for t in report["tables"].values():
        for r in t["results"]:
            if r["success"] or unusable(r) or not r.get("considered"):
                continue
            n, bad = r["considered"], r["unexpected_count"]
            mostly = r["kwargs"].get("mostly", 1.0)
            explained = (1 - mostly) + 3 * math.sqrt(mostly * (1 - mostly) / n)
            verdict = "within" if bad / n <= explained else "more than"
            log(
                f"warning: {source}: {r['expectation']} on {r['column']!r}: {bad} of {n} rows "
                f"({bad / n:.2%}), {verdict} the {explained:.2%} a batch of {n} rows explains; "
                "predicted, each with its warning where the model read a value as missing"
            )


def unusable(r: dict) -> bool:
    """A failed expectation that makes the batch unusable as a whole: its columns, or a
    column of the wrong type throughout (half its values or more; a few words in a column of
    numbers are that row's warning)."""
    if r["success"] or r["expectation"] not in WHOLE_BATCH:
        return False
    considered = r.get("considered")
    return not considered or r["unexpected_count"] >= considered / 2


def count_warnings(counts: dict, warned: list[list[str]]) -> None:
    """Warnings per column (a warning starts with its column's name)."""
    for row in warned:
        for w in row:
            col = w.split(" = ", 1)[0]
            counts[col] = counts.get(col, 0) + 1


def run(
    params: Params, model_dir: Path = layout.model_dir("tabular"), out: Path | None = None
) -> dict:
    p = params.tabular.infer
    out = Path(out or p.output)
    card = read_card(model_dir / layout.card("tabular").name)
    source = p.source
    suite_file = card.validation.suite_file
    suite = for_inference(load_suite(suite_file))
    if params.tabular.data.engine == "spark":
        if p.explain:
            raise StageError(
                "tabular.infer.explain is not available with tabular.data.engine: spark"
            )
        from stages.tabular.spark import infer as spark_infer

        with atomic_dir(out) as tmp:
            stats, seconds = spark_infer(
                card,
                model_dir / card.onnx.file,
                suite,
                source,
                suite_file,
                p.batch_size,
                tmp,
                "parquet" if out.suffix == ".parquet" else "csv",
                predict,
            )
    else:
        # GX checks the input in the validation worker, which reads it for itself while it
        # is predicted and written here: GX is pure Python, and as long as the bare loop.
        frames = functools.partial(input_frames, source, card.features, card.target)
        checked = run_suite_aside(suite, {"input": frames})
        seconds, rows, failed, counts = 0.0, 0, None, {}
        try:
            session = open_session(model_dir / card.onnx.file, spinning=False)
            with atomic_path(out) as tmp:
                writer = Writer(tmp, card)
                try:
                    for df in frames():
                        start = time.perf_counter()
                        try:
                            predicted, feats, warned = predict_outputs(
                                card, session, df, source, p.batch_size
                            )
                        except StageError as e:
                            # A chunk that can't be predicted (a column of the wrong type);
                            # GX's report names every broken value, so it speaks first below.
                            failed = e
                            break
                        also = (
                            attribution_columns(card, session, df, predicted, source)
                            if p.explain
                            else []
                        )
                        seconds += time.perf_counter() - start
                        writer.write(predicted, df.index.to_numpy(), feats, warned, also)
                        rows += len(df)
                        count_warnings(counts, warned)
                finally:
                    writer.close()
                judge(checked(), source, suite_file)
                if failed is not None:
                    raise failed
        finally:
            checked.cancel()  # a run that stopped early: its report is not waited for
        stats = {"rows": rows, "warnings": counts}
    timing = {"seconds": round(seconds, 4), "rows_per_s": round(stats["rows"] / max(seconds, 1e-9))}
    write_json(layout.infer_stats("tabular"), stats)
    write_timing("infer-tabular", timing)
    log(f"predicted {stats['rows']} rows from {source} → {out} ({timing['rows_per_s']} rows/s)")
    return {**stats, **timing}
