"""onnxruntime sessions (and softmax) for `infer`, the export parity check and the app. Torch-free.

Options are chosen, not defaulted: intra-op threads = physical cores (more makes
onnxruntime several times slower on these machines), full graph optimisation, and
spinning off when the process does other work between calls (a server).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs this container may use per the cgroup CPU quota (v2 cpu.max, v1 cfs_quota_us /
    cfs_period_us); None when unlimited or unreadable."""
    try:
        if (root / "cpu.max").is_file():
            quota, _, period = (root / "cpu.max").read_text().partition(" ")
            return None if quota == "max" else int(quota) / int(period)
        for v1 in (root / "cpu", root / "cpu,cpuacct"):
            if (v1 / "cpu.cfs_quota_us").is_file():
                quota = int((v1 / "cpu.cfs_quota_us").read_text())
                return None if quota <= 0 else quota / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        pass
    return None


def physical_cores(
    cpuinfo: Path = Path("/proc/cpuinfo"),
    cgroup: Path = Path("/sys/fs/cgroup"),
    allowed: set[int] | None = None,
) -> int:
    """Threads worth running: the physical cores among the CPUs this process may run on
    (os.sched_getaffinity), capped by the cgroup CPU quota (rounded down: 1.5 CPUs of
    quota is one thread that is never throttled). More threads than this oversubscribe
    (onnxruntime and torch are several times slower)."""
    if allowed is None:
        allowed = (
            os.sched_getaffinity(0)
            if hasattr(os, "sched_getaffinity")
            else set(range(os.cpu_count() or 1))
        )
    cores, proc, phys = set(), None, "0"
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            proc, phys, core = int(value), "0", None
        elif key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key and proc is not None:  # the end of a processor's block
            if proc in allowed:
                cores.add((phys, core if core is not None else f"cpu{proc}"))
            proc = None
    n = len(cores) or len(allowed) or 1
    limit = cgroup_cpu_limit(cgroup)
    return max(1, min(n, int(limit))) if limit else n


def open_session(path: str | Path, threads: int | None = None, spinning: bool = True):
    import onnxruntime as ort

    from stages.core import numerics

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # In a pinned stage (stages/core/numerics.py) the baseline's count: MLAS splits a
    # matrix product's rows over its threads, and the rows at a split add in another order.
    opts.intra_op_num_threads = threads or (
        numerics.THREADS if numerics.pinned() else physical_cores()
    )
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_batches(session, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Run the single-input model over `x` in batches; returns the first output stacked."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def run_all(session, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """run_batches for every output of the model (the logits, and the features for trust)."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    if not outs:
        return [np.zeros((0,), np.float32) for _ in session.get_outputs()]
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]
