"""Process-group, device, AMP and seeding setup shared by every torch model.

One process: `python -m stages train TASK`. Several: the same command with
`train.nproc: N` in params.yaml re-launches itself under torchrun, which sets
RANK / LOCAL_RANK / WORLD_SIZE; multi-node runs call torchrun directly, e.g.
`torchrun --nnodes=2 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400
--nproc-per-node=1 -m stages train tabular` on each node.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.distributed as dist

from stages.core.cli import StageError
from stages.core.schema import Amp

AMP_MODES: tuple[str, ...] = get_args(Amp)


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Runtime:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is 'cuda' but no CUDA device is available")
    if device not in ("auto", "cuda", "cpu"):
        raise StageError(f"train.device is {device!r}; choose one of: auto, cuda, cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        # nccl for GPUs; gloo is the backend that works on CPU.
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rt = Runtime(
        rank,
        local_rank,
        world,
        torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )
    configure_backends(rt.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return rt


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def relaunch_under_torchrun(nproc: int, module: str, args: list[str]) -> bool:
    """Run `python -m module args` as `nproc` local processes under torchrun.

    Returns False (do nothing) when nproc is 1 or we already are a torchrun worker.
    """
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return False
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]
    result = subprocess.run(cmd)
    if result.returncode:
        raise StageError(
            f"torchrun with {nproc} processes failed (exit {result.returncode}); see the log above"
        )
    return True


def cpu_supports_bf16() -> bool:
    """bf16 autocast is only fast on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere
    it is emulated and many times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_supports_bf16(device: torch.device) -> bool:
    """Native bf16 tensor cores: compute capability 8.0 and later (Ampere, Hopper, ...);
    earlier GPUs emulate it slowly, where fp16 with loss scaling is the fast path."""
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass(frozen=True)
class AmpPolicy:
    """What `train.amp` means on this device: autocast on or off, its dtype, and whether
    the loss is scaled (GradScaler)."""

    enabled: bool
    dtype: torch.dtype
    scaler: bool

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)


def amp_policy(mode: str, device: torch.device) -> AmpPolicy:
    """auto: bf16 on CUDA devices with native bf16, fp16 + GradScaler on older ones; bf16 on
    a CPU with native bf16; else off."""
    if mode is False:
        mode = (
            "off"  # YAML 1.1 (PyYAML) reads an unquoted `off` as false; DVC's -S writes it unquoted
        )
    if mode not in AMP_MODES:
        raise StageError(f"train.amp is {mode!r}; choose one of: {', '.join(AMP_MODES)}")
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if cuda_supports_bf16(device) else "fp16"
        else:
            from stages.core import numerics

            # On the numeric baseline (AVX2) no CPU has native bf16: every CPU trains in fp32,
            # as one without it would (else this machine's bf16 would be its own result).
            mode = "bf16" if cpu_supports_bf16() and not numerics.pinned() else "off"
    if mode == "fp16" and device.type != "cuda":
        raise StageError("train.amp 'fp16' needs a CUDA device; use 'bf16', 'auto' or 'off' on CPU")
    if mode == "off":
        return AmpPolicy(False, torch.float32, False)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    return AmpPolicy(True, torch.float16 if mode == "fp16" else torch.bfloat16, mode == "fp16")


def configure_backends(device: torch.device, local_world_size: int = 1) -> dict:
    """Per-process math settings, returned for the log. CUDA: TF32 for fp32 matmuls and
    convolutions (Ampere and later run them on tensor cores, ~10-bit mantissa: the speed-up
    that every training recipe takes; no effect on older GPUs). CPU: torch threads =
    physical cores within the cgroup quota and affinity, shared by the local ranks (torch
    counts every core of the host, so a container limited to 2 CPUs ran 64 threads); on the
    numeric baseline (stages/core/numerics.py) its fixed thread count instead, and CUDA's
    deterministic algorithms (the same bits run to run on one GPU model)."""
    from stages.core import numerics

    pinned = {"deterministic": True} if numerics.pinned() else {}
    if pinned:
        # warn_only: an op without a deterministic kernel warns (naming itself), not stops.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False  # benchmark picks kernels by timing
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return {"tf32": True, **pinned}
    from stages.core.inference import physical_cores

    cores = numerics.THREADS if pinned else physical_cores()
    threads = max(1, cores // max(local_world_size, 1))
    torch.set_num_threads(threads)
    return {"threads": threads, **pinned}


def seed_everything(seed: int, rank: int = 0) -> None:
    """Offset by rank so that ranks draw different dropout masks and augmentations."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def all_reduce_sums(sums: dict[str, torch.Tensor], rt: Runtime) -> dict[str, float]:
    """Sum per-rank totals across ranks (float64, in one collective)."""
    keys = sorted(sums)
    t = torch.stack([sums[k].detach().double().reshape(()) for k in keys]).to(rt.device)
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist(), strict=False))
