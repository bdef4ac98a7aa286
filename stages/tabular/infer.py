"""infer: batch predictions with onnxruntime, and the serving hook the app calls. Imports no torch.

    python -m stages infer tabular   # CSV/parquet, checked by the GX suite (no target checks) → data/predictions/tabular.csv

The input is read, checked and predicted in chunks (a file larger than memory streams
through); run(out=....parquet) writes parquet instead of CSV. With `tabular.data.engine:
spark` the same runs on Spark (mapInPandas around predict(); docs/spark.md) and the output is
a folder of CSV parts. Also writes metrics/tabular/infer.json with its throughput.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.common import StageError, atomic_dir, atomic_path, log, read_json, write_json, write_timing
from stages.core.expectations import for_inference, load_suite, merge_reports, run_suite_aside, summarise
from stages.core.inference import open_session, run_batches
from stages.tabular.data import Preprocessor, decode_outputs, feature_chunks

CHUNK_ROWS = 1_000_000


def predict(card: dict, session, df: pd.DataFrame, source: str = "input", batch_size: int = 4096) -> pd.DataFrame:
    """Typed feature rows → the predictions table: class and per-class probabilities, or the
    value. `infer` and the app both call this, so they answer alike."""
    x = Preprocessor.from_dict(card["preprocessing"]).transform(df, source)
    outputs = run_batches(session, x, batch_size)
    if not np.isfinite(outputs).all():
        raise StageError(f"{source}: some values are so far out of range that the model gives no finite prediction")
    return decode_outputs(outputs, card)


def arrow_table(table: pd.DataFrame, lines: np.ndarray):
    """Predictions as an arrow table with the line first; numbers as float32 (7 significant
    digits, what `%.6g` kept, written by arrow's C++ instead of Python's formatting: half of
    `infer`'s time on 100,000 rows went to `to_csv(float_format="%.6g")`; `make bench`)."""
    import pyarrow as pa

    cols = {"line": pa.array(lines)}
    for c in table.columns:
        v = table[c].to_numpy()
        cols[c] = pa.array(v.astype(np.float32) if v.dtype.kind == "f" else v)
    return pa.table(cols)


class Writer:
    """Appends prediction chunks to a CSV or a parquet file (by the suffix)."""

    def __init__(self, path: Path):
        self.path, self.writer = path, None

    def write(self, table) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema) if self.path.suffix == ".parquet" else \
                pacsv.CSVWriter(self.path, table.schema, write_options=pacsv.WriteOptions(quoting_style="needed"))
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run(params: dict, model_dir: Path = Path("models/tabular"),
        out: Path = Path("data/predictions/tabular.csv")) -> dict:
    p = params["tabular"]["infer"]
    card = read_json(model_dir / "model.json")
    source = p["source"]
    suite_file = card["validation"]["suite_file"]
    suite = for_inference(load_suite(suite_file))
    if params["tabular"]["data"].get("engine") == "spark":
        from stages.tabular.spark import infer as spark_infer

        with atomic_dir(out) as tmp:
            stats, seconds = spark_infer(card, model_dir / card["onnx"]["file"], suite, source, suite_file,
                                         p["batch_size"], tmp)
    else:
        session = open_session(model_dir / card["onnx"]["file"], spinning=False)
        seconds, rows, failed, report = 0.0, 0, None, None
        with atomic_path(out) as tmp:
            writer = Writer(tmp)
            try:
                for df in feature_chunks(source, card["features"], CHUNK_ROWS):
                    df = df.drop(columns=[card["target"]], errors="ignore")
                    # GX checks the chunk in a forked process while it is predicted and written
                    # here: GX is the costliest step on 100,000 rows, and pure Python (`make bench`).
                    checked = run_suite_aside(suite, df)
                    if failed is None:
                        try:
                            start = time.perf_counter()
                            table = predict(card, session, df, source, p["batch_size"])
                            seconds += time.perf_counter() - start
                            writer.write(arrow_table(table, df.index.to_numpy()))
                            rows += len(df)
                        except StageError as e:
                            # A chunk GX is about to fail (an unseen category) can't be predicted;
                            # GX's report names every broken value, so it speaks first below.
                            failed = e
                    report = checked() if report is None else merge_reports(report, checked())
            finally:
                writer.close()
            if failed is not None and report["success"]:
                raise failed
            if not report["success"]:
                # Rows are numbered by CSV line ("row 5" is line 5, not the fifth data row): say so.
                raise StageError(f"{source} does not meet the expectations in {suite_file} (target checks excluded)\n"
                                 + summarise(report, {"input": f"{source}, rows numbered by CSV line"}))
        stats = {"rows": rows}
    timing = {"seconds": round(seconds, 4), "rows_per_s": round(stats["rows"] / max(seconds, 1e-9))}
    write_json(Path("metrics/tabular/infer.json"), stats)
    write_timing("infer-tabular", timing)
    log(f"predicted {stats['rows']} rows from {source} → {out} ({timing['rows_per_s']} rows/s)")
    return {**stats, **timing}
