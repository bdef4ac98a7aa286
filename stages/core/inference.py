"""onnxruntime sessions (and softmax) for `infer`, the export parity check and the app. Torch-free.

Options are chosen, not defaulted: intra-op threads = physical cores (more makes
onnxruntime several times slower on these machines), full graph optimisation, and
spinning off when the process does other work between calls (a server).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def physical_cores() -> int:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return max(len(cores), 1) if cores else (os.cpu_count() or 1)


def open_session(path: str | Path, threads: int | None = None, spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_batches(session, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Run the single-input model over `x` in batches; returns the first output stacked."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
