"""infer: batch predictions with onnxruntime, after validating the input. Imports no torch.

    python -m stages.infer tabular

Reads `tabular.infer.source` (CSV or parquet; a target column is ignored), checks it
with the task's GX suite minus its target expectations, and writes
data/predictions/tabular.csv (line, prediction, probability, p_<class>...) and
metrics/tabular/infer.json (rows, seconds, rows/s).
"""
from __future__ import annotations

import time
from pathlib import Path

from stages.common import StageError, atomic_path, log, read_json, run_stage, write_json
from stages.expectations import for_inference, load_suite, run_suite, summarise
from stages.onnx_session import open_session, run_batches
from stages.tabular import Preprocessor, decode_outputs, read_features


def infer_tabular(params: dict, model_dir: Path = Path("models/tabular"),
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
    x = Preprocessor.from_dict(card["preprocessing"]).transform(df, source)
    outputs = run_batches(session, x, p["batch_size"])
    table = decode_outputs(outputs, card)
    seconds = time.perf_counter() - start
    table.insert(0, "line", df.index.to_numpy())
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    stats = {"rows": len(table), "seconds": round(seconds, 4), "rows_per_s": round(len(table) / max(seconds, 1e-9))}
    write_json(Path("metrics/tabular/infer.json"), stats)
    log(f"predicted {len(table)} rows from {source} → {out} ({stats['rows_per_s']} rows/s)")
    return stats


if __name__ == "__main__":
    run_stage({"tabular": infer_tabular})
