"""export: the trained model → ONNX (dynamic batch) + a model card, checked against torch.

    python -m stages.export tabular

Fails when onnxruntime and torch disagree on the test split beyond `export.parity_atol`
or on any predicted class. Outputs: models/<task>/model.onnx, models/<task>/model.json,
and models/<task>/model.ts when `export.torchscript` is on.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.common import StageError, atomic_path, git_revision, log, read_json, run_stage, write_json
from stages.evaluate import load_model, predict, split_images
from stages.image import preprocess
from stages.onnx_session import open_session, run_batches
from stages.tabular import Preprocessor


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Dynamo export with a symbolic batch dimension; everything else stays fixed."""
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), input_names=["input"],
                                    output_names=["output"], dynamo=True, verbose=False)
        program.save(str(tmp))


def check_parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray, atol: float, classify: bool,
                 min_agreement: float = 1.0) -> dict:
    """onnxruntime vs torch on the same inputs: batch 1, batch N, max abs difference and
    (for classifiers) the share of identical top-1 classes."""
    session = open_session(onnx_path)
    expected = predict(model, x)
    got = run_batches(session, x, batch_size=min(len(x), 256))
    single = run_batches(session, x[:1], batch_size=1)
    if got.shape != expected.shape or single.shape != expected[:1].shape:
        raise StageError(f"{onnx_path}: output shape {got.shape} (batch {len(x)}) / {single.shape} (batch 1) "
                         f"differs from torch's {expected.shape}")
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(1) == expected.argmax(1)).mean()) if classify else 1.0
    result = {"max_abs_diff": diff, "class_agreement": agree, "rows": len(x), "atol": atol}
    if diff > atol or agree < min_agreement:
        raise StageError(f"{onnx_path}: onnxruntime disagrees with torch on {len(x)} test inputs "
                         f"(max abs diff {diff:.3g}, limit {atol}; top-1 agreement {agree:.4f}, "
                         f"minimum {min_agreement})")
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_common(task: str, kind: str, onnx_path: Path, input_shape: list, meta: dict, parity: dict,
                export_params: dict) -> dict:
    """The model-card fields every task shares."""
    validation = read_json(f"metrics/{task}/validation.json")
    return {
        "task": task,
        "kind": kind,
        "git_revision": git_revision(),
        "onnx": {"file": onnx_path.name, "sha256": sha256(onnx_path), "input": "input", "output": "output",
                 "input_shape": input_shape},
        "metrics": read_json(f"metrics/{task}/metrics.json"),
        "training": meta["train"],
        "params": {**meta["schema"]["params"], **meta["params"], f"{task}.export": export_params},
        "validation": {"success": validation["success"], "suite_file": validation["suite_file"]},
        "parity": parity,
        "data": {"source": meta["schema"]["source"], "rows": meta["schema"]["rows"]},
    }


def export_tabular(params: dict, out_dir: Path = Path("models/tabular")) -> dict:
    p = params["tabular"]["export"]
    model, meta = load_model(out_dir / "model.pt")
    schema, pre = meta["schema"], Preprocessor.from_dict(meta["preprocessor"])
    x_test = pre.transform(pd.read_parquet("data/prepared/tabular/test.parquet"))
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, torch.from_numpy(x_test[:2]), onnx_path)
    parity = check_parity(model, onnx_path, x_test, p["parity_atol"], schema["task"] == "classification")
    if p["torchscript"]:
        with atomic_path(out_dir / "model.ts") as tmp:
            torch.jit.trace(model, torch.from_numpy(x_test[:2])).save(str(tmp))
    card = {
        **card_common("tabular", schema["task"], onnx_path, ["batch", pre.n_features], meta, parity, p),
        "target": schema["target"],
        "classes": schema["classes"],
        "features": [{**f, **({"categories": pre.categories[f["name"]]} if f["type"] == "categorical" else {})}
                     for f in schema["features"]],
        "preprocessing": pre.to_dict(),
        "preprocessing_notes": "numeric: median-impute, then (x - mean) / std; categorical: one-hot in the "
                               "listed order (missing = all zeros, unseen = error); see stages/tabular.py",
        "target_scaling": meta["target_scaling"],
        "postprocessing": "softmax over output" if schema["task"] == "classification"
                          else "output * target_scaling.std + target_scaling.mean",
    }
    write_json(out_dir / "model.json", card)
    log(f"exported {onnx_path} (parity: max abs diff {parity['max_abs_diff']:.2e} over {parity['rows']} rows)")
    return card


def export_image(params: dict, out_dir: Path = Path("models/image")) -> dict:
    p = params["image"]["export"]
    model, meta = load_model(out_dir / "model.pt")
    schema = meta["schema"]
    paths, _ = split_images(schema)
    x_test = preprocess(paths, schema)
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, torch.from_numpy(x_test[:2]), onnx_path)
    parity = check_parity(model, onnx_path, x_test, p["parity_atol"], True, p["min_top1_agreement"])
    size = schema["image_size"]
    card = {
        **card_common("image", "classification", onnx_path, ["batch", 3, size, size], meta, parity, p),
        "classes": schema["classes"],
        "preprocessing": {"image_size": size, "mean": schema["mean"], "std": schema["std"], "mode": "RGB",
                          "resize": "bilinear to image_size x image_size (aspect ratio not kept)",
                          "scale": "x / 255", "layout": "NCHW float32"},
        "postprocessing": "softmax over output",
    }
    write_json(out_dir / "model.json", card)
    log(f"exported {onnx_path} (parity: max abs diff {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['class_agreement']:.4f} over {parity['rows']} images)")
    return card


if __name__ == "__main__":
    run_stage({"tabular": export_tabular, "image": export_image})
