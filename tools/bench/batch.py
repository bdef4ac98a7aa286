"""Benchmark section 3: the infer stage's core end to end vs a bare loop with the same helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import layout
from stages.core.card import Card, read_card
from stages.core.inference import open_session
from stages.core.params import load_params
from stages.core.schema import replaced
from tools.bench.repo import (
    ROOT,
    chdir,
    synthetic_csv,
)
from tools.bench.timing import alternate, median, ratio_row


def tabular_steps(read, pre, tsession, bs: int, tcard: Card, work: Path, rounds: int) -> dict:
    """infer_tabular's steps, each timed alone with the same helpers and session."""
    from stages.core.expectations import for_inference, load_suite, run_suite
    from stages.core.inference import run_batches
    from stages.tabular import infer as tabular_infer
    from stages.tabular.data import scores

    suite = for_inference(load_suite(ROOT / tcard.validation.suite_file))
    df = read()
    x = pre.transform(df)
    out = run_batches(tsession, x, bs)
    predicted = scores(out, tcard)
    return alternate(
        {
            "read + type the CSV": read,
            "GX validation": lambda: run_suite(suite, {"input": df}),
            "open the session": lambda: open_session(ROOT / layout.model_onnx("tabular")),
            "preprocess": lambda: pre.transform(df),
            "session.run": lambda: run_batches(tsession, x, bs),
            "scores (softmax)": lambda: scores(out, tcard),
            "write the CSV": lambda: write_predictions(
                tabular_infer, tcard, predicted, df, work / "steps.csv"
            ),
            "write parquet": lambda: write_predictions(
                tabular_infer, tcard, predicted, df, work / "steps.parquet"
            ),
        },
        rounds,
    )


def batch_report(med: dict, steps: dict, n_rows: int, n_files: int) -> tuple[list, list]:
    """(rows, notes) from the median seconds of each contender and of infer_tabular's steps."""
    rows, notes = [], []
    rows.append(
        ratio_row(
            f"tabular, {n_rows:,} rows",
            ("infer_tabular", n_rows / med["infer_tabular"], "rows/s"),
            ("bare loop", n_rows / med["bare"], "rows/s"),
            0.8,
        )
    )
    rows.append(
        ratio_row(
            f"image, {n_files} test images",
            ("infer_image", n_files / med["infer_image"], "images/s"),
            ("bare loop", n_files / med["bare image"], "images/s"),
            0.8,
        )
    )
    step_s = {k: median(v) for k, v in steps.items()}
    total = sum(step_s.values())
    notes.append(
        "both sides read and type the same CSV, preprocess and run with the same helpers and session "
        "options; the bare loop decodes into predict()'s table and skips GX validation and writing; "
        "infer_tabular writes the CSV from the scores"
    )
    notes.append(
        "infer_tabular, step by step: "
        + ", ".join(
            f"{k} {v * 1e3:.0f} ms ({v / total:.0%})"
            for k, v in sorted(step_s.items(), key=lambda kv: -kv[1])
        )
    )
    return rows, notes


def batch(quick: bool, scratch: Path) -> dict:
    """The infer stage's core end to end vs a bare loop with the same helpers and session."""
    from stages.core.images import list_images
    from stages.core.inference import run_batches, softmax
    from stages.image import infer as image_infer
    from stages.image.data import preprocess, top_k
    from stages.tabular import infer as tabular_infer
    from stages.tabular.data import Preprocessor, decode_outputs, read_features

    params = load_params()
    ip = params.image.infer
    n_rows = 2_000 if quick else 100_000
    work = scratch / "batch"  # infer writes metrics/<task>/infer.json under its working folder
    (work / "data").mkdir(parents=True)
    (work / "data" / "expectations").symlink_to(
        ROOT / "data" / "expectations"
    )  # the card names its suite so
    csv = synthetic_csv(work / "rows.csv", n_rows)
    params = replaced(
        params, {"tabular.infer.source": str(csv), "image.infer.source": str(ROOT / ip.source)}
    )
    ip = params.image.infer
    tcard, icard = read_card(layout.card("tabular")), read_card(layout.card("image"))
    # Without spinning, as infer_tabular's: the bare loops' sessions stay open between samples, and
    # spinning ones keep a core busy after each run, which took a third of that core from
    # whichever contender came next (infer_tabular, with its validation worker, 132 → 161 ms).
    tsession, isession = (
        open_session(ROOT / layout.model_onnx(t), spinning=False) for t in ("tabular", "image")
    )
    pre, bs = (
        Preprocessor.from_dict(tcard.preprocessing),
        params.tabular.infer.batch_size,
    )
    table, root = list_images(ip.source, labelled=False)
    files = table["path"].tolist()

    def read():
        return read_features(csv, tcard.features).drop(columns=[tcard.target], errors="ignore")

    def bare_tabular():
        df = read()
        return decode_outputs(run_batches(tsession, pre.transform(df, str(csv)), bs), tcard)

    def bare_image():
        for i in range(0, len(files), ip.batch_size):
            x = preprocess([root / f for f in files[i : i + ip.batch_size]], icard.preprocessing)
            top_k(
                softmax(run_batches(isession, x, ip.batch_size).astype("float64")),
                icard.classes,
                ip.top_k,
            )

    rounds = 2 if quick else 7
    details = {"tabular_rows": n_rows, "images": len(files)}
    with chdir(work):
        times = alternate(
            {
                "infer_tabular": lambda: tabular_infer.run(
                    params, ROOT / "models/tabular", work / "t.csv"
                ),
                "bare": bare_tabular,
                "infer_image": lambda: image_infer.run(
                    params, ROOT / "models/image", work / "i.csv"
                ),
                "bare image": bare_image,
            },
            rounds,
        )
        # Where infer_tabular's time goes: its steps, timed one by one with the same helpers.
        steps = tabular_steps(read, pre, tsession, bs, tcard, work, rounds)
    med = {k: median(v) for k, v in times.items()}
    rows, notes = batch_report(med, steps, n_rows, len(files))
    details["seconds"] = med
    details["infer_tabular_steps_s"] = {k: median(v) for k, v in steps.items()}
    return {"rows": rows, "notes": notes, "details": details}


def write_predictions(
    tabular_infer, card: Card, predicted: np.ndarray, df: pd.DataFrame, path: Path
) -> None:
    writer = tabular_infer.Writer(path, card)
    writer.write(predicted, df.index.to_numpy())
    writer.close()
