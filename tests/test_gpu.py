"""The trainer's GPU decisions for real, on a CUDA device (skipped without one; the same
decisions are unit-tested with faked capabilities in tests/test_trainer.py):
`amp: auto` picks bf16 where the GPU has it natively and fp16 + GradScaler elsewhere,
TF32 is on for matmuls and convolutions, `compile` runs torch.compile (inductor), and
every AMP mode trains."""

from __future__ import annotations

import pytest
import torch
from test_trainer import BASE, blobs

from stages.core.distributed import AmpPolicy, Runtime, amp_policy, configure_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def gpu():
    return Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))


def test_auto_amp_and_tf32_on_this_gpu(gpu):
    major, _ = torch.cuda.get_device_capability(gpu.device)
    want = (
        AmpPolicy(True, torch.bfloat16, False)
        if major >= 8
        else AmpPolicy(True, torch.float16, True)
    )
    assert amp_policy("auto", gpu.device) == want
    assert configure_backends(gpu.device) == {"tf32": True}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("amp,compile_", [("auto", False), ("fp16", False), ("off", True)])
def test_fit_on_the_gpu(gpu, tmp_path, amp, compile_):
    from stages.core.distributed import seed_everything
    from stages.core.trainer import LoopConfig, classification_sums, fit, load_checkpoint
    from stages.tabular.model import MLP

    seed_everything(0)
    model = MLP(4, [32], 3, dropout=0.1)
    cfg = LoopConfig(**{**BASE, "amp": amp, "device": "cuda", "compile": compile_, "epochs": 4})
    summary = fit(
        model,
        blobs(),
        blobs(60, seed=1),
        sums_fn=classification_sums,
        cfg=cfg,
        rt=gpu,
        seed=0,
        ckpt_dir=tmp_path,
        fingerprint="gpu",
    )
    assert summary["best_metrics"]["val_acc"] > 0.9
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert not any("_orig_mod" in k for k in ckpt["model"])
    assert bool(ckpt["scaler"]) == (
        amp_policy(amp, gpu.device).scaler
    )  # GradScaler state only with fp16
