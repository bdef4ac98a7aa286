"""export: the served model → models/tabular/model.onnx (dynamic batch) + model.json (the
model card that serving reads), failing when onnxruntime and the Python models disagree on
the test split. The served model is the network, or the network and gradient boosting in one
graph (stages/tabular/graph.py) with the boost stage's weights: the card's `ensemble`.

    python -m stages export tabular
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.core import layout
from stages.core.card import Card, card_common, reference, validated_ranges, write_card
from stages.core.cli import log
from stages.core.documents import Columns
from stages.core.files import atomic_path
from stages.core.onnx_export import (
    FirstOutput,
    WithFeatures,
    check_outputs,
    check_parity,
    export_onnx,
)
from stages.core.schema import Params
from stages.tabular.boost import Served, load_served
from stages.tabular.data import sample_split, split_chunks
from stages.tabular.explain import card_section
from stages.tabular.trust import fit_trust

TRAIN = layout.prepared("tabular") / "train.parquet"
PARITY_ROWS = 100_000
REFERENCE_ROWS = 1_000_000


def ignored_columns(schema: Columns) -> list[str]:
    """The CSV's columns the model does not read; a column without a header ("", the index
    pandas writes) also as pandas reads it back ("Unnamed: 0"), the name a client sends."""
    used = {f.name for f in schema.features}
    names = [r["column"] for r in schema.columns or []]
    out = [c for c in names if c not in used]
    return out + [f"Unnamed: {i}" for i, c in enumerate(names) if c == "" and c not in used]


def run(params: Params, out_dir: Path = layout.model_dir("tabular")) -> Card:
    p = params.tabular.export
    served = load_served()
    model, meta, pre, schema = served.model, served.meta, served.pre, served.schema
    # What serving reads as missing, with a warning (Preprocessor.screen): numbers outside the
    # range validate checked the training data against (observed, widened by range_margin).
    pre.ranges = {
        c: [float(r[0]), float(r[1])]
        for c, r in validated_ranges("tabular").items()
        if c in pre.numeric and len(r) == 2 and None not in r
    }
    # Parity on the test split's first rows: enough to catch a wrong graph, bounded on big data.
    x_test = pre.transform(
        next(split_chunks(layout.prepared("tabular") / "test.parquet", PARITY_ROWS)).iloc[
            :PARITY_ROWS
        ]
    )
    onnx_path = out_dir / layout.MODEL_ONNX_FILE
    # The graph: (served outputs / temperature, penultimate features): calibrated, with what
    # OOD reads.
    trust = fit_trust(params, served)
    if served.boosted:
        parity = export_served(served, trust["temperature"], x_test, onnx_path, p.parity_atol)
    else:  # the network alone, exported as it always was
        wrapped = WithFeatures(model, trust["temperature"])
        export_onnx(wrapped, torch.from_numpy(x_test[:2]), onnx_path, ("output", "features"))
        parity = check_parity(
            FirstOutput(wrapped), onnx_path, x_test, p.parity_atol, served.classify
        )
    if p.torchscript:
        with atomic_path(out_dir / "model.ts") as tmp:
            torch.jit.trace(model, torch.from_numpy(x_test[:2])).save(str(tmp))
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
        # The CSV's columns the model does not read (ids, constants, dropped, the target):
        # serving accepts a row with them, as it is in the file, and ignores them.
        "ignored": ignored_columns(schema),
        "preprocessing": pre.to_dict(),
        "task_inferred": schema.task_why,
        "preprocessing_notes": "numeric, date parts (dates: format), text SVD components (texts: "
        "char_wb n-gram tf-idf, l2, times components): median-impute, then (x - mean) / std; "
        "categorical: one-hot in the listed order (missing = all zeros); an unseen category, an "
        "unparseable date or a number outside `ranges` is read as missing, with a warning; see "
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
        "ensemble": served.ensemble,
    }
    card = write_card(out_dir / layout.card("tabular").name, card)
    log(
        f"exported {onnx_path} (parity: max abs diff {parity['max_abs_diff']:.2e} over {parity['rows']} rows)"
    )
    return card


def export_served(
    served: Served, temperature: float | None, x_test, onnx_path: Path, atol: float
) -> dict:
    """The network and boosting as one graph at onnx_path; parity against the network (torch)
    and boosting (scikit-learn) mixed in numpy (ensemble.combine), divided by temperature."""
    import onnx

    from stages.tabular.graph import merge

    net = WithFeatures(served.model).eval()  # the temperature is applied after the mix
    export_onnx(net, torch.from_numpy(x_test[:2]), onnx_path, ("output", "features"))
    width = len(served.schema.classes) if served.classify else 1
    graph = merge(
        onnx.load(str(onnx_path)),
        served.boosting,
        served.ensemble["weights"],
        temperature,
        served.classify,
        served.pre.n_features,
        width,
    )
    with atomic_path(onnx_path) as tmp:
        onnx.save(graph, str(tmp))
    expected = served.outputs(x_test) / (temperature or 1.0)
    return check_outputs(
        expected.astype("float32"),
        onnx_path,
        x_test,
        atol,
        served.classify,
        source="torch and scikit-learn",
    )
