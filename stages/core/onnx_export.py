"""Trained torch models: load one, predict with it, export it to ONNX with a dynamic batch,
and check onnxruntime against torch (the parity gate)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.core.cli import StageError
from stages.core.files import atomic_path
from stages.core.inference import open_session, run_batches
from stages.core.trainer import load_checkpoint


def load_model(
    path: str | Path, build: Callable[[dict], torch.nn.Module]
) -> tuple[torch.nn.Module, dict]:
    """models/<task>/model.pt → (the model in eval mode, the meta that train stored beside it)."""
    ck = load_checkpoint(Path(path))
    model = build(ck["meta"]["arch"])
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck["meta"]


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate(
        [
            model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
            for i in range(0, max(len(x), 1), batch_size)
        ]
    )


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Dynamo export with a symbolic batch dimension; everything else stays fixed."""
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(
            model,
            (example,),
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["output"],
            dynamo=True,
            verbose=False,
        )
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


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    x: np.ndarray,
    atol: float,
    classify: bool,
    min_agreement: float = 1.0,
) -> dict:
    """onnxruntime vs torch on the same inputs: batch 1, batch N, max abs difference and
    (for classifiers) the share of identical top-1 classes."""
    session = open_session(onnx_path)
    expected = predict(model, x)
    got = run_batches(session, x, batch_size=min(len(x), 256))
    single = run_batches(session, x[:1], batch_size=1)
    if got.shape != expected.shape or single.shape != expected[:1].shape:
        raise StageError(
            f"{onnx_path}: output shape {got.shape} (batch {len(x)}) / {single.shape} (batch 1) "
            f"differs from torch's {expected.shape}"
        )
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(1) == expected.argmax(1)).mean()) if classify else 1.0
    result = {"max_abs_diff": diff, "class_agreement": agree, "rows": len(x), "atol": atol}
    if diff > atol or agree < min_agreement:
        raise StageError(
            f"{onnx_path}: onnxruntime disagrees with torch on {len(x)} test inputs "
            f"(max abs diff {diff:.3g}, limit {atol}; top-1 agreement {agree:.4f}, "
            f"minimum {min_agreement})"
        )
    return result
