"""Issue 38: one numeric baseline for every stage (stages/core/numerics.py). Proof without a
second CPU: the parent process is set up as two different CPUs would leave it (torch's
kernel choice and oneDNN's ISA cap in the environment before the stage starts); the pinned
stage writes the same bytes under both, the unpinned one does not (so the test can fail)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, set_params, stage

from stages.core import numerics

# What each CPU's libraries would pick on their own (ATen's widest build, oneDNN's widest JIT).
CPUS = {
    "an SSE4.1 machine": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "an AVX-512 machine": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL"},
}


def train_as(repo: Path, cpu: dict) -> str:
    """The md5 of model.pt from a fresh `python -m stages train tabular` under cpu's env."""
    shutil.rmtree(repo / "models/tabular/checkpoints", ignore_errors=True)  # no resume
    env = {**os.environ, **cpu}
    res = subprocess.run(
        [sys.executable, "-m", "stages", "train", "tabular"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return hashlib.md5((repo / "models/tabular/model.pt").read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_cpus_train_the_same_bytes_on_the_baseline_and_not_without(repo: Path):
    set_params(repo, {"tabular.train.epochs": 3})
    stage(repo, "prepare")
    stage(repo, "validate")
    pinned = {name: train_as(repo, cpu) for name, cpu in CPUS.items()}
    assert len(set(pinned.values())) == 1, f"the baseline still follows the CPU: {pinned}"
    set_params(repo, {"reproducible": False})
    free = {name: train_as(repo, cpu) for name, cpu in CPUS.items()}
    assert len(set(free.values())) == 2, (
        f"without the pin the two CPUs trained the same bytes, so this test proves nothing: {free}"
    )


def test_the_pin_refuses_once_torch_is_loaded():
    import torch  # noqa: F401  (pytest's process has it: the pin would come too late)

    with pytest.raises(RuntimeError, match="too late"):
        numerics.pin()


def test_the_pin_reaches_a_child_process_and_overrides_the_parent(tmp_path: Path):
    """What the dispatcher sets is in os.environ, so torchrun's workers and any subprocess
    inherit it; a parent's thread count (Ultralytics sets OMP_NUM_THREADS=1) is replaced."""
    code = (
        "import os, subprocess, sys\n"
        "from stages.core import numerics\n"
        "numerics.pin()\n"
        "out = subprocess.run([sys.executable, '-c', 'import os, torch; "
        'print(os.environ["ATEN_CPU_CAPABILITY"], torch.get_num_threads(), '
        "torch.backends.cpu.get_cpu_capability())'], capture_output=True, text=True)\n"
        "print(out.stdout.strip())\n"
    )
    script = tmp_path / "child.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    aten, threads, isa = res.stdout.split()
    assert (aten, int(threads)) == ("avx2", numerics.THREADS)
    if numerics.has_baseline_isa():
        assert isa == "AVX2"  # torch's own report of the kernels it took


def test_baseline_isa_from_cpu_flags(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 fma\n")
    assert numerics.has_baseline_isa(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_1 sse4_2\n")  # an Atom, a masked VM
    assert not numerics.has_baseline_isa(str(info))


FIT = """
import hashlib, json, sys
from stages.core import numerics
numerics.pin(sys.argv[1] == "pin")
import numpy as np
from stages.core import trust
rng = np.random.default_rng(0)  # the image demo's shapes: 1167 training, 270 validation rows
train, val = rng.normal(size=(1167, 128)), rng.normal(size=(270, 128))
fit = trust.fit(0.1, 0.02, rng.normal(size=(270, 10)), rng.integers(0, 10, 270),
                val, train, rng.integers(0, 10, 1167), True)
print(hashlib.md5(json.dumps(fit).encode()).hexdigest())
"""


@pytest.mark.slow
def test_the_trust_fit_ignores_a_parents_thread_count(tmp_path: Path):
    """The same-machine cause of issue 38: export@image's card changed on a forced rerun when
    the parent's OMP_NUM_THREADS changed (Ultralytics sets 1 when a test imports it). numpy's
    OpenBLAS splits the OOD distances' matrix product by rows over its threads, and on its
    AVX2 (Haswell, Zen) kernels a row at a block edge adds in another order: one calibration
    distance moved in the 13th digit. Pinned, the parent's count no longer reaches it."""
    script = tmp_path / "fit.py"
    script.write_text(FIT)

    def fit(mode: str, threads: int) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        env["OPENBLAS_CORETYPE"] = "Haswell"  # the AMD machine's kernels, on any CPU
        res = subprocess.run(
            [sys.executable, str(script), mode], env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert fit("pin", 1) == fit("pin", 8)
    assert fit("free", 1) != fit("free", 8), "the unpinned fit no longer follows the threads"
