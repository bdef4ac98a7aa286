"""One numeric baseline for every stage process, so that another x86-64 CPU computes the
same bits (docs/reproducibility.md). The math libraries pick their kernels by the CPU's
instruction set and split their sums by the thread count, both read from the environment
when the library loads: so the dispatcher (stages/__main__.py) calls pin() before anything
imports torch, numpy, onnxruntime or Ultralytics. Child processes (torchrun's DDP workers,
DVC's stage runs, data loader workers) inherit the environment, and so the pin.

The baseline is AVX2 + FMA (x86-64-v3): on every Intel Core since Haswell (2013), every AMD
since Excavator (2015) and Zen, every cloud x86 instance. It is missing on Atom / Pentium /
Celeron parts before about 2021 and on VMs that mask AVX: there pin() says so in one line
(the libraries then fall back to SSE code, other bits). SSE4.1, the baseline of every
x86-64 of the decade, doubled the training time of a small conv net and an MLP here
(docs/reproducibility.md); AVX2 cost nothing against AVX-512 on the same machine.
Torch-free: only os.
"""

from __future__ import annotations

import os
import sys

THREADS = 2  # intra-op threads of every library: the sums' split must not follow the core count
MARK = "STAGES_NUMERICS"  # "baseline" once pinned; configure_backends() reads it

BASELINE = {
    # ATen's vectorised CPU kernels (torch.*, autograd): without it torch takes the widest it
    # was built for (AVX-512 on this machine), whose reductions add in another order.
    "ATEN_CPU_CAPABILITY": "avx2",
    # oneDNN's JIT (convolutions, linear layers, pooling): caps the ISA it emits; AVX-512 and
    # AMX kernels block the same convolution differently.
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # MKL's conditional numerical reproducibility: one code path (AVX2) on every CPU, and the
    # same result run to run whatever the arrays' memory alignment.
    "MKL_CBWR": "AVX2",
    # numpy's and scipy's OpenBLAS (LedoitWolf, the trust fit's matrix products): its kernels
    # for Haswell (AVX2) instead of the CPU's own (SkylakeX, Zen, ...).
    "OPENBLAS_CORETYPE": "Haswell",
    # numpy's own SIMD loops (exp, log, sums): no AVX-512 variants (numpy >= 2.4 names).
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    # Thread counts: torch (OpenMP) and MKL, OpenBLAS; a parent's OMP_NUM_THREADS (Ultralytics
    # sets one when imported, e.g. in a test process) no longer leaks in.
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "OPENBLAS_NUM_THREADS": str(THREADS),
    # cuBLAS: deterministic reductions need a fixed workspace (with
    # torch.use_deterministic_algorithms, set by configure_backends on CUDA).
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    MARK: "baseline",
}
LOADED_TOO_EARLY = ("torch", "numpy", "onnxruntime", "ultralytics")


def pin(reproducible: bool = True) -> None:
    """Set the baseline in os.environ (overriding what a parent set); nothing when
    reproducible is false (params.yaml `reproducible`: the CPU's fastest kernels)."""
    loaded = [m for m in LOADED_TOO_EARLY if m in sys.modules]
    if loaded:  # a programming error: the switches are read once, at load
        raise RuntimeError(f"numerics.pin() after {', '.join(loaded)} loaded: too late")
    if not reproducible:
        os.environ.pop(MARK, None)
        return
    os.environ.update(BASELINE)
    if not has_baseline_isa():
        print(
            "warning: this CPU lacks AVX2/FMA, the numeric baseline (stages/core/numerics.py): "
            "outputs will differ in the last bits from the committed ones",
            file=sys.stderr,
        )


def pinned() -> bool:
    return os.environ.get(MARK) == "baseline"


def has_baseline_isa(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AVX2 and FMA in the CPU flags (true where /proc/cpuinfo is unreadable: not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True
    return not flags or {"avx2", "fma"} <= set(flags)
