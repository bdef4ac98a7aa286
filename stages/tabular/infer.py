"""infer: batch predictions with onnxruntime, and the serving hook the app calls. Imports no torch.

    python -m stages infer tabular   # CSV/parquet, checked by the GX suite (no target checks) → data/predictions/tabular.csv

Also writes metrics/tabular/infer.json with its throughput.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.common import StageError, atomic_path, log, read_json, write_json, write_timing
from stages.core.expectations import for_inference, load_suite, run_suite, summarise
from stages.core.inference import open_session, run_batches
from stages.tabular.data import Preprocessor, decode_outputs, read_features


def predict(card: dict, session, df: pd.DataFrame, source: str = "input", batch_size: int = 4096) -> pd.DataFrame:
    """Typed feature rows → the predictions table: class and per-class probabilities, or the
    value. `infer` and the app both call this, so they answer alike."""
    x = Preprocessor.from_dict(card["preprocessing"]).transform(df, source)
    outputs = run_batches(session, x, batch_size)
    if not np.isfinite(outputs).all():
        raise StageError(f"{source}: some values are so far out of range that the model gives no finite prediction")
    return decode_outputs(outputs, card)


def run(params: dict, model_dir: Path = Path("models/tabular"),
        out: Path = Path("data/predictions/tabular.csv")) -> dict:
    p = params["tabular"]["infer"]
    card = read_json(model_dir / "model.json")
    source = p["source"]
    df = read_features(source, card["features"])
    df = df.drop(columns=[card["target"]], errors="ignore")
    suite_file = card["validation"]["suite_file"]
    report = run_suite(for_inference(load_suite(suite_file)), {"input": df})
    if not report["success"]:
        # read_csv numbers rows by CSV line ("row 5" is line 5, not the fifth data row): say so.
        where = f"{source}, rows numbered by CSV line" if df.index.name == "line" else source
        raise StageError(f"{source} does not meet the expectations in {suite_file} (target checks excluded)\n"
                         + summarise(report, {"input": where}))
    session = open_session(model_dir / card["onnx"]["file"])
    start = time.perf_counter()
    table = predict(card, session, df, source, p["batch_size"])
    seconds = time.perf_counter() - start
    table.insert(0, "line", df.index.to_numpy())
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    stats = {"rows": len(table)}
    timing = {"seconds": round(seconds, 4), "rows_per_s": round(len(table) / max(seconds, 1e-9))}
    write_json(Path("metrics/tabular/infer.json"), stats)
    write_timing("infer-tabular", timing)
    log(f"predicted {len(table)} rows from {source} → {out} ({timing['rows_per_s']} rows/s)")
    return {**stats, **timing}
