"""Trained torch models: load one, predict with it, export it to ONNX with a dynamic batch,
check onnxruntime against torch, and the model-card fields every task shares."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stages.core.common import StageError, atomic_path, read_json
from stages.core.inference import open_session, run_batches
from stages.core.trainer import load_checkpoint


def load_model(path: str | Path, build: Callable[[dict], torch.nn.Module]) -> tuple[torch.nn.Module, dict]:
    """models/<task>/model.pt → (the model in eval mode, the meta that train stored beside it)."""
    ck = load_checkpoint(Path(path))
    model = build(ck["meta"]["arch"])
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck["meta"]


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).float().numpy()
                           for i in range(0, max(len(x), 1), batch_size)])


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Dynamo export with a symbolic batch dimension; everything else stays fixed."""
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), input_names=["input"],
                                    output_names=["output"], dynamo=True, verbose=False)
        program.save(str(tmp))
        strip_stack_traces(tmp)


def strip_stack_traces(path: Path) -> None:
    """Drop the Python stack traces the dynamo exporter stores on every node: they name the
    absolute paths of the source files, so the same model exported from another clone (or
    a temp copy) had other bytes. The graph, weights and names stay."""
    import onnx

    model = onnx.load(str(path))
    for graph_nodes in [model.graph.node, *(f.node for f in model.functions)]:
        for node in graph_nodes:
            kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    onnx.save(model, str(path))


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


def provenance(task: str, model_file: Path, lock_file: Path = Path("dvc.lock")) -> dict:
    """What produced the model, in a form that does not depend on the workspace being clean:
    the md5 of model.pt, and the deps (code folders, data) and params of the train stage as
    dvc.lock records them, when that stage wrote this very model.pt. A git commit is left
    out on purpose: `dvc repro` rewrites dvc.lock while it runs (so the tree is never clean
    then), and a commit in the card would change model.json, and so dvc.lock, on every commit."""
    import yaml

    md5 = hashlib.md5(model_file.read_bytes()).hexdigest()
    stage = f"train@{task}"
    entry = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}).get(stage) if lock_file.is_file() else None
    if not entry or not any(o["path"] == model_file.as_posix() and o.get("md5") == md5 for o in entry.get("outs", [])):
        return {"model_md5": md5, "stage": stage, "deps": None, "params": None,
                "note": f"dvc.lock does not record this model.pt as the output of {stage} (trained outside `dvc repro`?)"}
    return {"model_md5": md5, "stage": stage, "deps": {d["path"]: d.get("md5") for d in entry.get("deps", [])},
            "params": entry.get("params", {})}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_common(task: str, kind: str, onnx_path: Path, input_shape: list, meta: dict, parity: dict,
                export_params: dict) -> dict:
    """The model-card fields every task shares."""
    validation = read_json(f"metrics/{task}/validation.json")
    session = open_session(onnx_path, threads=1)
    return {
        "task": task,
        "kind": kind,
        "provenance": provenance(task, Path("models") / task / "model.pt"),
        "onnx": {"file": onnx_path.name, "sha256": sha256(onnx_path), "input": session.get_inputs()[0].name,
                 "output": session.get_outputs()[0].name, "input_shape": input_shape},
        "metrics": read_json(f"metrics/{task}/metrics.json"),
        "training": meta["train"],
        "params": {**meta["schema"]["params"], **meta["params"], f"{task}.export": export_params},
        "validation": {"success": validation["success"], "suite_file": validation["suite_file"]},
        "parity": parity,
        "data": {"source": meta["schema"]["source"], "rows": meta["schema"]["rows"]},
    }
