"""The training stage every torch task shares: the task builds a Job (model, datasets,
metric sums, data files, meta); this runs it through the loop in one process or under
torchrun, logs to DVCLive on rank 0, and writes models/<task>/model.pt.

    python -m stages train tabular                       # one process, or <task>.train.nproc under torchrun
    torchrun --nproc-per-node=2 -m stages train image    # the same, launched by hand

Outputs: models/<task>/model.pt (best weights + everything needed to rebuild and serve
them), metrics/<task>/train/ (DVCLive), and the scratch folder models/<task>/checkpoints/
(full state for resume; kept between runs).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from stages.core.common import log
from stages.core.distributed import relaunch_under_torchrun, seed_everything, setup, teardown
from stages.core.trainer import LoopConfig, fit, load_checkpoint, save_checkpoint


@dataclass
class Job:
    """What a task hands the shared training driver."""

    model: torch.nn.Module
    arch: dict
    train_set: Dataset
    val_set: Dataset
    sums_fn: Callable
    data_files: list[Path]  # hashed into the run's fingerprint
    meta: dict  # stored beside the weights for evaluate/export


def fingerprint(params: dict, files: list[Path], world_size: int) -> str:
    """Identifies a training run: a checkpoint is resumed only by the run it belongs to."""
    h = hashlib.sha256(json.dumps([params, world_size], sort_keys=True).encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def train(task: str, params: dict, make_job: Callable[[dict], Job]) -> None:
    p = params[task]["train"]
    cfg = LoopConfig.from_params(p, f"{task}.train")
    if relaunch_under_torchrun(cfg.nproc, "stages", ["train", task]):
        return
    out_dir, live_dir = Path("models") / task, Path("metrics") / task / "train"
    rt = setup(cfg.device)
    try:
        seed_everything(params["seed"], rt.rank)
        job = make_job(params)
        ckpt_dir = out_dir / "checkpoints"
        fp = fingerprint({"train": p, "seed": params["seed"]}, job.data_files, rt.world_size)
        live = None
        if rt.is_main:
            from dvclive import Live

            # Never DVCLive's resume (it appends to whatever a killed run left, torn or not):
            # start the folder afresh; a resumed fit() rewrites the earlier epochs from last.pt.
            live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
            live.log_params({f"{task}.train": p, "seed": params["seed"], "world_size": rt.world_size})
        summary = fit(job.model, job.train_set, job.val_set, sums_fn=job.sums_fn, cfg=cfg, rt=rt,
                      seed=params["seed"], ckpt_dir=ckpt_dir, fingerprint=fp, live=live)
        if rt.is_main:
            best = load_checkpoint(ckpt_dir / "best.pt")
            meta = {"task": task, "arch": job.arch, **job.meta, "train": summary,
                    "params": {"seed": params["seed"], f"{task}.train": p}}
            save_checkpoint(out_dir / "model.pt", {"state_dict": best["model"], "meta": meta})
            live.end()
            log(f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: "
                + " ".join(f"{k}={v:.4g}" for k, v in summary["best_metrics"].items()) + f" → {out_dir}/model.pt")
    finally:
        teardown()
