"""The model card (models/<task>/model.json): its typed model, read and written here only,
and the fields every task shares: provenance, the ONNX file, metrics, and the `reference`
statistics serving checks inputs against. Torch-free: infer and app/ read the card.

The card is a public file that clients and tools read: its field names and meanings stay
(fields are added, never renamed), and a reader keeps fields it does not know (a newer
writer's), as Document does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from stages.core import layout
from stages.core.documents import Document, Feature, Meta, Prepared
from stages.core.files import read_json
from stages.core.inference import open_session
from stages.core.schema import Section, plain


class Onnx(Document):
    file: str  # beside model.json
    sha256: str
    input: str
    output: str
    input_shape: list


class Validation(Document):
    success: bool
    suite_file: str  # the GX suite inputs are checked against (infer, serving)


class Data(Document):
    source: str
    rows: dict


class Card(Document):
    """models/<task>/model.json. Every task's card has task, kind and onnx; the rest is there
    where the task has it (tabular: target, features, target_scaling; detect: no trust)."""

    task: str  # tabular | image | detect
    kind: str  # classification | regression | detection
    provenance: dict = {}
    onnx: Onnx
    metrics: dict = {}
    training: dict = {}
    params: dict = {}
    validation: Validation | None = None
    parity: dict | None = None
    data: Data | None = None
    target: str | None = None
    classes: list | None = None  # class labels (detect: category names); None for regression
    features: list[Feature] | None = None
    preprocessing: dict = {}
    target_scaling: dict | None = None  # regression: {mean, std} the outputs are scaled back by
    reference: dict | None = None  # training-data statistics for input checks and drift
    postprocessing: str | dict | None = None
    trust: dict | None = None  # conformal sets and OOD (stages/core/trust.py)
    # tabular: columns, background, how attributions are estimated (stages/tabular/explain.py);
    # image: the graph's `cam` output, or why it has none (stages/image/cam.py)
    explain: dict | None = None
    ensemble: dict | None = None  # tabular: the served members, weights and why (boost stage)
    registry: dict | None = None  # the registered version it came from (tools/registry.py)


def read_card(path: str | Path) -> Card:
    return Card.read(path)


def parse_card(text: str | bytes) -> Card:
    """A card from its JSON text (fetched from a registry, a git revision)."""
    return Card.model_validate(json.loads(text))


def write_card(path: str | Path, card: Card | dict) -> Card:
    """Checks a card against the model and writes it, its fields in the order given."""
    card = card if isinstance(card, Card) else Card.model_validate(card)
    card.write(path)
    return card


def provenance(task: str, model_file: Path, lock_file: Path = Path("dvc.lock")) -> dict:
    """What produced the model, in a form that does not depend on the workspace being clean:
    the md5 of model.pt, and the deps (code folders, data) and params of the train stage as
    dvc.lock records them, when that stage wrote this very model.pt. A git commit is left
    out on purpose: `dvc repro` rewrites dvc.lock while it runs (so the tree is never clean
    then), and a commit in the card would change model.json, and so dvc.lock, on every commit."""
    import yaml

    md5 = hashlib.md5(model_file.read_bytes()).hexdigest()
    stage = f"train@{task}"
    entry = (
        (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}).get(stage)
        if lock_file.is_file()
        else None
    )
    if not entry or not any(
        o["path"] == model_file.as_posix() and o.get("md5") == md5 for o in entry.get("outs", [])
    ):
        return {
            "model_md5": md5,
            "stage": stage,
            "deps": None,
            "params": None,
            "note": f"dvc.lock does not record this {layout.MODEL_PT_FILE} as the output of "
            f"{stage} (trained outside `dvc repro`?)",
        }
    return {
        "model_md5": md5,
        "stage": stage,
        "deps": {d["path"]: d.get("md5") for d in entry.get("deps", [])},
        "params": entry.get("params", {}),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_common(
    task: str,
    kind: str,
    onnx_path: Path,
    input_shape: list,
    meta: Meta,
    parity: dict,
    export_params: Section,
) -> dict:
    """The model-card fields every task shares."""
    validation = read_json(layout.validation(task))
    session = open_session(onnx_path, threads=1)
    prepared = Prepared.model_validate(meta.prepared)
    return {
        "task": task,
        "kind": kind,
        "provenance": provenance(task, layout.model_pt(task)),
        "onnx": {
            "file": onnx_path.name,
            "sha256": sha256(onnx_path),
            "input": session.get_inputs()[0].name,
            "output": session.get_outputs()[0].name,
            "input_shape": input_shape,
        },
        "metrics": read_json(layout.metrics(task)),
        "training": meta.train,
        "params": {**prepared.params, **meta.params, f"{task}.export": plain(export_params)},
        "validation": {"success": validation["success"], "suite_file": validation["suite_file"]},
        "parity": parity,
        "data": {"source": prepared.source, "rows": prepared.rows},
    }


QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def validated_ranges(task: str) -> dict:
    """{column: [min, max] or [allowed values]} from the suite results in
    metrics/<task>/validation.json (the first table that names the column wins)."""
    found = {}
    for table in read_json(layout.validation(task)).get("tables", {}).values():
        for r in table.get("results", []):
            kw, col = r.get("kwargs", {}), r.get("column")
            if col in found or col is None:
                continue
            if r.get("expectation") == "expect_column_values_to_be_between":
                found[col] = [kw.get("min_value"), kw.get("max_value")]
            elif r.get("expectation") == "expect_column_values_to_be_in_set":
                found[col] = list(kw.get("value_set", []))
    return found


def reference(columns: dict, valid: dict, source: str) -> dict:
    """The card's `reference`: what the training data looked like, for input checks and
    drift at serving time (app/monitor.py). Per column (a pandas Series each, lengths may
    differ): numbers: range, quantiles, null share, the validated range (from the GX suite;
    None where it has none) and decile bins with the share of values in each (bin i holds
    edges[i-1] <= x < edges[i], np.searchsorted(..., side="right")), which PSI compares
    with; categories: their shares, the mode, the null share and the allowed set."""
    import pandas as pd

    features = {}
    for name, s in columns.items():
        nulls = round(float(s.isna().mean()), 6) if len(s) else 0.0
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            v = s.dropna().to_numpy("float64")
            if not len(v):
                features[name] = {
                    "type": "numeric",
                    "null_share": nulls,
                    "valid": valid.get(name),
                    "bins": [],
                    "shares": [],
                }
                continue
            edges = np.unique(np.quantile(v, np.linspace(0.1, 0.9, 9)))
            counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
            features[name] = {
                "type": "numeric",
                "min": float(v.min()),
                "max": float(v.max()),
                "median": float(np.median(v)),
                "quantiles": {
                    f"p{round(q * 100):02d}": float(x)
                    for q, x in zip(QUANTILES, np.quantile(v, QUANTILES), strict=False)
                },
                "null_share": nulls,
                "valid": valid.get(name),  # None: the suite has no range for it, so no input check
                "bins": edges.tolist(),
                "shares": (counts / len(v)).round(6).tolist(),
            }
        else:
            counts = s.dropna().astype(str).value_counts()
            shares = {k: round(float(counts[k]) / len(s.dropna()), 6) for k in sorted(counts.index)}
            features[name] = {
                "type": "categorical",
                "shares": shares,
                "mode": min(shares, key=lambda k: -shares[k])
                if shares
                else None,  # ties: first by name
                "null_share": nulls,
                "valid": sorted(map(str, valid[name])) if name in valid else None,
            }
    return {"source": source, "features": features}
