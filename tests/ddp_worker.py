"""A tiny training run for tests/test_distributed.py, launched under torchrun.

    torchrun --standalone --nproc-per-node=2 tests/ddp_worker.py OUT_DIR [--batchnorm] [--n-val=N]

Builds the same small dataset on every rank (no randomness outside the seed), trains it
with stages.core.trainer.fit on the CPU (gloo), and writes:
  OUT_DIR/init.pt         rank 0's weights before training (DDP broadcasts them to all ranks)
  OUT_DIR/rank{RANK}.pt   each rank's final weights
  OUT_DIR/summary{RANK}.json  fit's return value on each rank
  OUT_DIR/live/           DVCLive, written by rank 0 only
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from stages.core.distributed import seed_everything, setup, teardown
from stages.core.trainer import LoopConfig, classification_sums, fit
from stages.tabular.model import MLP

SEED = 7
EPOCHS = 3
N_TRAIN = 96
N_VAL = 33  # odd on purpose: rank 0 scores 17 validation rows (2 batches of 16), rank 1 scores 16 (1 batch)


def make_data(
    n_val: int = N_VAL,
) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + n_val, 4, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 1.5]) > 0).long()
    ds = torch.utils.data.TensorDataset
    return ds(x[:N_TRAIN], y[:N_TRAIN]), ds(x[N_TRAIN:], y[N_TRAIN:])


def make_model(batchnorm: bool) -> nn.Module:
    if batchnorm:
        # A model with buffers (BatchNorm running stats): DDP broadcasts rank 0's buffers
        # at the start of a forward call (a collective), including the first one in eval.
        return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    return MLP(4, [16], 2, dropout=0.1)


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    batchnorm = "--batchnorm" in argv[1:]
    n_val = next((int(a.split("=", 1)[1]) for a in argv[1:] if a.startswith("--n-val=")), N_VAL)
    cfg = LoopConfig(
        epochs=EPOCHS,
        batch_size=8,
        lr=0.01,
        weight_decay=0.0,
        scheduler="cosine",
        step_size=1,
        gamma=0.5,
        grad_clip=1.0,
        grad_accum=2,
        amp="off",
        patience=0,
        monitor="val_loss",
        num_workers=0,
        device="cpu",
        nproc=1,
    )
    rt = setup("cpu")
    try:
        seed_everything(SEED, rt.rank)
        train_set, val_set = make_data(n_val)
        model = make_model(batchnorm)
        live = None
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / "init.pt")
            from dvclive import Live

            live = Live(str(out / "live"), dvcyaml=False, save_dvc_exp=False)
        summary = fit(
            model,
            train_set,
            val_set,
            sums_fn=classification_sums,
            cfg=cfg,
            rt=rt,
            seed=SEED,
            ckpt_dir=out / "ckpt",
            fingerprint="ddp-test",
            live=live,
        )
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / f"rank{rt.rank}.pt")
        (out / f"summary{rt.rank}.json").write_text(
            json.dumps({**summary, "world_size": rt.world_size})
        )
        if live is not None:
            live.end()
    finally:
        teardown()


if __name__ == "__main__":
    assert "RANK" in os.environ, "run me under torchrun"
    main(sys.argv[1:])
