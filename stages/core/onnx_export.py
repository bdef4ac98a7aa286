"""Trained torch models: load one, predict with it, export it to ONNX with a dynamic batch,
and check onnxruntime against torch (the parity gate)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.core.cli import StageError
from stages.core.documents import Meta
from stages.core.files import atomic_path
from stages.core.inference import open_session, run_batches
from stages.core.trainer import load_checkpoint


def load_model(
    path: str | Path, build: Callable[[dict], torch.nn.Module]
) -> tuple[torch.nn.Module, Meta]:
    """models/<task>/model.pt → (the model in eval mode, the meta that train stored beside it)."""
    ck = load_checkpoint(Path(path))
    meta = Meta.model_validate(ck["meta"])
    model = build(meta.arch)
    model.load_state_dict(ck["state_dict"])
    return model.eval(), meta


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate(
        [
            model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
            for i in range(0, max(len(x), 1), batch_size)
        ]
    )


def export_onnx(
    model: torch.nn.Module, example: torch.Tensor, path: Path, outputs: tuple = ("output",)
) -> None:
    """Dynamo export with a symbolic batch dimension; everything else stays fixed. In eval
    mode: a wrapper module (WithFeatures) starts in training mode, and export would warn and
    trace training-time behaviour (dropout, batch statistics)."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(
            model,
            (example,),
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=list(outputs),
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
    return check_outputs(predict(model, x), onnx_path, x, atol, classify, min_agreement, "torch")


def check_outputs(
    expected: np.ndarray,
    onnx_path: Path,
    x: np.ndarray,
    atol: float,
    classify: bool,
    min_agreement: float = 1.0,
    source: str = "torch",
) -> dict:
    """check_parity against outputs computed by `source` (torch, or torch and scikit-learn)."""
    session = open_session(onnx_path)
    got = run_batches(session, x, batch_size=min(len(x), 256))
    single = run_batches(session, x[:1], batch_size=1)
    if got.shape != expected.shape or single.shape != expected[:1].shape:
        raise StageError(
            f"{onnx_path}: output shape {got.shape} (batch {len(x)}) / {single.shape} (batch 1) "
            f"differs from {source}'s {expected.shape}"
        )
    diff = float(np.abs(got - expected).max())
    # The card records the difference rounded up to a power of ten: onnxruntime picks its
    # kernels by the CPU's instruction set (no switch to pin them), so the exact value is
    # one CPU's; the decade is what every CPU agrees on (docs/reproducibility.md). At most
    # atol, which the check below has just held it to.
    recorded = min(float(f"1e{math.ceil(math.log10(diff))}"), atol) if diff > 0 else 0.0
    agree = float((got.argmax(1) == expected.argmax(1)).mean()) if classify else 1.0
    result = {"max_abs_diff": recorded, "class_agreement": agree, "rows": len(x), "atol": atol}
    if diff > atol or agree < min_agreement:
        raise StageError(
            f"{onnx_path}: onnxruntime disagrees with {source} on {len(x)} test inputs "
            f"(max abs diff {diff:.3g}, limit {atol}; top-1 agreement {agree:.4f}, "
            f"minimum {min_agreement})"
        )
    return result


class WithFeatures(torch.nn.Module):
    """The model as export writes it: (outputs / temperature, penultimate features), the
    features being the input of the last nn.Linear (the head), which the OOD score reads
    (stages/core/trust.py). Found by a forward pre-hook so that every architecture here
    (the MLP, the small CNN, torchvision's) works unchanged; a model without a Linear gives
    its flattened input. temperature None: outputs as they are (regression)."""

    def __init__(self, model: torch.nn.Module, temperature: float | None = None):
        super().__init__()
        self.model, self.temperature = model, temperature
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        # A list held by the hook's closure, not a module attribute: export warns about
        # tensors stored on modules.
        seen: list[torch.Tensor] = []
        self._seen = lambda: seen
        self.head = heads[-1] if heads else None
        self.handle = (
            self.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            if self.head is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen().clear()
        out = self.model(x)
        feats = self._seen()[-1] if self.head is not None else x.flatten(1)
        if self.temperature is not None:
            out = out / self.temperature
        return out, feats.flatten(1)


class FirstOutput(torch.nn.Module):
    """A two-output module's first output: what the parity check compares."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


@torch.inference_mode()
def outputs_and_features(
    model: torch.nn.Module, x: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The raw outputs and penultimate features of `model` (not yet wrapped) over x."""
    wrapped, outs, feats = WithFeatures(model), [], []
    for i in range(0, max(len(x), 1), batch_size):
        o, f = wrapped(torch.from_numpy(x[i : i + batch_size]))
        outs.append(o.float().numpy())
        feats.append(f.float().numpy())
    if wrapped.handle is not None:
        wrapped.handle.remove()
    return np.concatenate(outs), np.concatenate(feats)
