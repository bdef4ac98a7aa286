"""train: fit the task's torch model with the shared loop (stages/trainer.py).

    python -m stages.train tabular     # one process, or train.nproc under torchrun
    torchrun --nproc-per-node=2 -m stages.train tabular   # the same, launched by hand

Outputs: models/<task>/model.pt (best weights + everything needed to rebuild and
serve them), models/<task>/checkpoints/ (full state for resume; kept between runs),
metrics/<task>/train/ (DVCLive, rank 0 only).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from stages.common import atomic_path, log, read_json, run_stage
from stages.distributed import relaunch_under_torchrun, seed_everything, setup, teardown
from stages.models import build_model
from stages.tabular import Preprocessor
from stages.trainer import LoopConfig, classification_sums, fit, load_checkpoint, regression_sums, resumable


def fingerprint(params: dict, files: list[Path], world_size: int) -> str:
    """Identifies a training run: a checkpoint is resumed only by the run it belongs to."""
    h = hashlib.sha256(json.dumps([params, world_size], sort_keys=True).encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def tabular_tensors(df: pd.DataFrame, pre: Preprocessor, schema: dict, scaling: dict | None) -> TensorDataset:
    x = torch.from_numpy(pre.transform(df))
    target = df[schema["target"]]
    if schema["task"] == "classification":
        y = torch.from_numpy(pd.Categorical(target, categories=schema["classes"]).codes.astype(np.int64))
    else:
        y = torch.from_numpy(((target.to_numpy("float64") - scaling["mean"]) / scaling["std"]).astype(np.float32))
    return TensorDataset(x, y)


def train_tabular(params: dict, out_dir: Path = Path("models/tabular"), live_dir: Path = Path("metrics/tabular/train")):
    p = params["tabular"]["train"]
    cfg = LoopConfig.from_params(p, "tabular.train")
    if relaunch_under_torchrun(cfg.nproc, "stages.train", ["tabular"]):
        return
    rt = setup(cfg.device)
    try:
        seed_everything(params["seed"], rt.rank)
        prepared = Path("data/prepared/tabular")
        schema = read_json(prepared / "schema.json")
        train_df = pd.read_parquet(prepared / "train.parquet")
        val_df = pd.read_parquet(prepared / "val.parquet")
        pre = Preprocessor.fit(train_df, {f["name"]: f["type"] for f in schema["features"]})
        scaling = None
        if schema["task"] == "regression":
            t = train_df[schema["target"]]
            scaling = {"mean": float(t.mean()), "std": float(t.std(ddof=0)) or 1.0}
        n_out = len(schema["classes"]) if schema["task"] == "classification" else 1
        arch = {"kind": "mlp", "n_in": pre.n_features, "hidden": list(p["hidden"]), "n_out": n_out,
                "dropout": float(p["dropout"])}
        model = build_model(arch)
        ckpt_dir = out_dir / "checkpoints"
        fp = fingerprint({"train": p, "seed": params["seed"]}, [prepared / "train.parquet", prepared / "val.parquet"],
                         rt.world_size)
        live = None
        if rt.is_main:
            from dvclive import Live

            live = Live(str(live_dir), resume=resumable(ckpt_dir, fp), dvcyaml=False, save_dvc_exp=False)
            live.log_params({"tabular.train": p, "seed": params["seed"], "world_size": rt.world_size})
        summary = fit(model, tabular_tensors(train_df, pre, schema, scaling), tabular_tensors(val_df, pre, schema, scaling),
                      sums_fn=classification_sums if schema["task"] == "classification" else regression_sums,
                      cfg=cfg, rt=rt, seed=params["seed"], ckpt_dir=ckpt_dir, fingerprint=fp, live=live)
        if rt.is_main:
            best = load_checkpoint(ckpt_dir / "best.pt")
            meta = {"task": "tabular", "arch": arch, "preprocessor": pre.to_dict(), "schema": schema,
                    "target_scaling": scaling, "train": summary,
                    "params": {"seed": params["seed"], "tabular.train": p}}
            with atomic_path(out_dir / "model.pt") as tmp:
                torch.save({"state_dict": best["model"], "meta": meta}, tmp)
            live.end()
            log(f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: "
                + " ".join(f"{k}={v:.4g}" for k, v in summary["best_metrics"].items()) + f" → {out_dir}/model.pt")
    finally:
        teardown()


if __name__ == "__main__":
    run_stage({"tabular": train_tabular})
