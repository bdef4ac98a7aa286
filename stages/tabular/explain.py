"""Explanations for the tabular model (the arithmetic is stages/core/explain.py): which
model inputs each original column became, the background sample the card carries, the
served model's answer as a function to explain, and permutation importance at evaluate.

The preprocessing (stages/tabular/data.py Preprocessor, serving.py Rows) encodes each column
on its own, so taking a column's raw value from a background row is the same as taking its
block of model inputs from that row's encoding: explanations work on model inputs, with no
second trip through the preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import explain, layout
from stages.core.cli import StageError, log
from stages.core.documents import Meta
from stages.core.files import write_json
from stages.core.inference import softmax
from stages.tabular.data import Preprocessor, sample_split
from stages.tabular.encoders import date_part_names

SEED = 0  # the background draw and the sampled permutations: fixed, so answers reproduce
IMPORTANCE_ROWS = 10_000  # test rows permuted: enough for a stable drop, bounded on big data


def blocks(pre: dict) -> tuple[list[str], list[np.ndarray]]:
    """(the original columns, each one's model-input indices), in the encoding's order:
    numbers, date parts, text components (the continuous block), then one-hot blocks."""
    widths = [(c, 1) for c in pre["numeric"]]
    widths += [(c, len(date_part_names(f))) for c, f in pre.get("dates", {}).items()]
    widths += [(c, len(e["components"])) for c, e in pre.get("texts", {}).items()]
    widths += [(c, len(pre["categories"][c])) for c in pre["categorical"]]
    ends = np.cumsum([w for _, w in widths])
    return [c for c, _ in widths], [
        np.arange(e - w, e) for (_, w), e in zip(widths, ends, strict=True)
    ]


def card_section(pre: Preprocessor, train: Path, export) -> dict:
    """The card's `explain`: the columns, a background of training rows (as model inputs:
    every k-th row of the split, then a fixed draw of them) and how serving estimates
    (tabular.export)."""
    rows = export.background_rows
    df, _ = sample_split(train, pre.columns, rows)
    x = pre.transform(df.sample(min(rows, len(df)), random_state=SEED), "training split")
    columns, _ = blocks(pre.to_dict())
    return {
        "columns": columns,
        "exact_columns": export.exact_columns,
        "permutations": export.permutations,
        "seed": SEED,
        "background": x.tolist(),
    }


def answer_values(card: dict, session):
    """The served answer as a function of model inputs: each class's probability (the
    softmax of the graph's output), or the prediction in the target's units."""
    out_name = card.onnx.output
    in_name = card.onnx.input
    scaling = card.target_scaling

    def f(z: np.ndarray) -> np.ndarray:
        out = session.run([out_name], {in_name: z})[0].astype("float64")
        if card.kind == "classification":
            return softmax(out)
        return out[:, :1] * scaling["std"] + scaling["mean"]

    return f


def attributions(card: dict, session, x: np.ndarray, predicted: np.ndarray | None):
    """(base_value [N], attributions [N, columns]) of each row's answer: the predicted
    class's probability (predicted: class indices), or the prediction (None)."""
    e = card.explain
    _, idx = blocks(card.preprocessing)
    return explain.shapley(
        answer_values(card, session),
        x,
        np.asarray(e["background"], np.float32),
        idx,
        predicted,
        e["exact_columns"],
        e["permutations"],
        e["seed"],
    )


def attribution_columns(card: dict, session, df: pd.DataFrame, scored: np.ndarray, source: str):
    """batch infer's `base_value` and `attr_<column>` columns (float32 arrow arrays) for a
    chunk of typed rows and its scores (tabular.infer.explain)."""
    import pyarrow as pa

    if card.explain is None:
        raise StageError(
            "tabular.infer.explain: the model card has no explanation background (exported "
            "before explanations existed): re-run `dvc repro export@tabular`"
        )
    pre = Preprocessor.from_dict(card.preprocessing)
    x = pre.transform(pre.screen(df)[0], source)  # unseen values as missing, as predicted
    predicted = scored.argmax(1) if card.kind == "classification" else None
    base, phi = attributions(card, session, x, predicted)
    return [
        ("base_value", pa.array(base.astype(np.float32))),
        *(
            (f"attr_{c}", pa.array(phi[:, j].astype(np.float32)))
            for j, c in enumerate(card.explain["columns"])
        ),
    ]


def importance_report(params, model_outputs, meta: Meta, pre: Preprocessor, out_dir: Path):
    """Permutation importance on (a sample of) the test split, per original column: the
    drop in the headline metric (accuracy, or R²) when the column is shuffled, mean and std
    over tabular.evaluate.importance_repeats shuffles. Writes importance.json and its plot."""
    schema = meta.columns()
    target, classify = schema.target, schema.task == "classification"
    df, _ = sample_split(
        layout.prepared("tabular") / "test.parquet", [*pre.columns, target], IMPORTANCE_ROWS
    )
    x = pre.transform(df, "test split")
    if classify:
        y = np.asarray(pd.Categorical(df[target], categories=schema.classes).codes)

        def score(z):
            return float((model_outputs(z).argmax(1) == y).mean())
    else:
        y = df[target].to_numpy("float64")
        scale = meta.target_scaling

        def score(z):
            pred = model_outputs(z)[:, 0] * scale["std"] + scale["mean"]
            return 1 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))

    columns, idx = blocks(pre.to_dict())
    repeats = params.tabular.evaluate.importance_repeats
    _, drops = explain.permutation_importance(score, x, idx, repeats, params.seed)
    result = {
        c: {"mean": round(float(d.mean()), 6), "std": round(float(d.std()), 6)}
        for c, d in sorted(zip(columns, drops, strict=True), key=lambda cd: -cd[1].mean())
    }
    write_json(out_dir / layout.IMPORTANCE.name, result)
    write_json(
        out_dir / "plots" / "importance.json",
        [{"column": c, "drop": v["mean"], "std": v["std"]} for c, v in result.items()],
    )
    metric = "accuracy" if classify else "r2"
    log(
        f"importance ({metric} drop, {repeats} shuffles of {len(x)} test rows): "
        + " ".join(f"{c}={v['mean']:.4f}" for c, v in list(result.items())[:5])
    )
    return result
