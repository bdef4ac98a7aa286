"""export: the MLP → models/tabular/model.onnx (dynamic batch) + model.json (the model card
that serving reads), failing when onnxruntime and torch disagree on the test split.

    python -m stages export tabular
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.core import layout
from stages.core.card import Card, card_common, reference, validated_ranges, write_card
from stages.core.cli import log
from stages.core.files import atomic_path
from stages.core.onnx_export import (
    FirstOutput,
    WithFeatures,
    check_parity,
    export_onnx,
    load_model,
)
from stages.core.schema import Params
from stages.tabular.data import Preprocessor, sample_split, split_chunks
from stages.tabular.explain import card_section
from stages.tabular.model import build_model
from stages.tabular.trust import fit_trust

TRAIN = layout.prepared("tabular") / "train.parquet"
PARITY_ROWS = 100_000
REFERENCE_ROWS = 1_000_000


def run(params: Params, out_dir: Path = layout.model_dir("tabular")) -> Card:
    p = params.tabular.export
    model, meta = load_model(out_dir / "model.pt", build_model)
    schema, pre = meta.columns(), Preprocessor.from_dict(meta.preprocessor)
    # Parity on the test split's first rows: enough to catch a wrong graph, bounded on big data.
    x_test = pre.transform(
        next(split_chunks(layout.prepared("tabular") / "test.parquet", PARITY_ROWS)).iloc[
            :PARITY_ROWS
        ]
    )
    onnx_path = out_dir / "model.onnx"
    # The graph: (logits / temperature, penultimate features): calibrated, with what OOD reads.
    trust = fit_trust(params, model, meta, pre)
    model = WithFeatures(model, trust["temperature"])
    export_onnx(model, torch.from_numpy(x_test[:2]), onnx_path, ("output", "features"))
    parity = check_parity(
        FirstOutput(model), onnx_path, x_test, p.parity_atol, schema.task == "classification"
    )
    if p.torchscript:
        with atomic_path(out_dir / "model.ts") as tmp:
            torch.jit.trace(model.model, torch.from_numpy(x_test[:2])).save(str(tmp))
    # Quantiles and shares (a sample will do) of numbers and categories: text and dates have
    # no shares worth keeping.
    train_sample, step = sample_split(TRAIN, pre.numeric + pre.categorical, REFERENCE_ROWS)
    card = {
        **card_common(
            "tabular", schema.task, onnx_path, ["batch", pre.n_features], meta, parity, p
        ),
        "target": schema.target,
        "classes": schema.classes,
        "features": [
            {
                **f.dump(),
                **({"categories": pre.categories[f.name]} if f.type == "categorical" else {}),
            }
            for f in schema.features
        ],
        "preprocessing": pre.to_dict(),
        "task_inferred": schema.task_why,
        "preprocessing_notes": "numeric, date parts (dates: format), text SVD components (texts: "
        "char_wb n-gram tf-idf, l2, times components): median-impute, then (x - mean) / std; "
        "categorical: one-hot in the listed order (missing = all zeros, unseen = error); see "
        "stages/tabular/data.py and encoders.py",
        "target_scaling": meta.target_scaling,
        "reference": reference(
            dict(train_sample.items()),
            validated_ranges("tabular"),
            f"{TRAIN} (the training split" + (f", every {step}th row)" if step > 1 else ")"),
        ),
        "postprocessing": "softmax over output (the logits / trust.temperature, in the graph)"
        if schema.task == "classification"
        else "output * target_scaling.std + target_scaling.mean",
        "trust": trust,
        "explain": card_section(pre, TRAIN, params.tabular.export),  # stages/tabular/explain.py
    }
    card = write_card(out_dir / layout.card("tabular").name, card)
    log(
        f"exported {onnx_path} (parity: max abs diff {parity['max_abs_diff']:.2e} over {parity['rows']} rows)"
    )
    return card
