"""The training stage every torch task shares: the task builds a Job (model, datasets,
metric sums, data files, meta); this runs it through the loop in one process or under
torchrun, logs to DVCLive on rank 0, and writes models/<task>/model.pt.

    python -m stages train tabular                       # one process, or <task>.train.nproc under torchrun
    torchrun --nproc-per-node=2 -m stages train image    # the same, launched by hand

Outputs: models/<task>/model.pt (best weights + everything needed to rebuild and serve
them), metrics/<task>/train/ (DVCLive), and the scratch folder models/<task>/checkpoints/
(full state for resume; kept between runs).

In an experiment queued by tools/tune.py, params `tune.trial` names an Optuna trial: each
epoch's validation metric is reported to its study, and when the study prunes the trial
the run stops there and ends normally, with the best weights so far and a `tune` block in
metrics/<task>/train/metrics.json saying "pruned". Ending normally (not failing) is what
lets the tuner tell a pruned trial from a broken one: DVC marks a failed stage's
experiment Failed and keeps none of its outputs, while a pruned trial is a valid, shorter
run whose numbers the tuner reads back with `dvc exp show --json` like any other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from stages.core import layout
from stages.core.cli import StageError, log
from stages.core.distributed import relaunch_under_torchrun, seed_everything, setup, teardown
from stages.core.documents import Meta
from stages.core.schema import Params, plain
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


class Pruned(Exception):
    """Raised from fit's on_epoch when the tune study prunes the trial."""


def tune_trial(pointer: str):
    """(Optuna trial, metric name) for params `tune.trial` = 'STUDY_DB:STUDY:NUMBER', set by
    tools/tune.py; None when empty, or when the study is not here or the trial has finished
    (an applied tune experiment reruns as plain training)."""
    if not pointer:
        return None
    import optuna

    db, name, number = pointer.rsplit(":", 2)
    if not Path(db).is_file():
        log(f"tune.trial: no study at {db}; training without reporting")
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Queue workers write to the one SQLite file at the same time: wait for its lock.
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 60}}
    )
    study_id = storage.get_study_id_from_name(name)
    cfg = storage.get_study_user_attrs(study_id)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
    if storage.get_trial(trial_id).state != optuna.trial.TrialState.RUNNING:
        log(f"tune.trial: trial {number} of {name} has finished; training without reporting")
        return None
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=cfg["startup_trials"], n_warmup_steps=cfg["warmup_epochs"]
    )
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    return optuna.trial.Trial(study, trial_id), cfg["metric"]


def pruning_callback(pointer: str, rt) -> Callable | None:
    """fit's on_epoch for a tune trial: rank 0 reports the metric and asks the study; every
    rank gets the answer, so all of them stop at the same epoch."""
    if not pointer:
        return None
    found = tune_trial(pointer) if rt.is_main else None

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        prune = False
        if found is not None:
            trial, metric = found
            if metric not in metrics:
                raise StageError(
                    f"tune: metric {metric!r} is not one of this task's: {', '.join(metrics)}"
                )
            trial.report(metrics[metric], epoch)
            prune = trial.should_prune()
        if rt.distributed:
            box = [prune]
            torch.distributed.broadcast_object_list(box, src=0)
            prune = box[0]
        if prune:
            raise Pruned(epoch + 1)

    return on_epoch


def train(task: str, params: Params, make_job: Callable[[Params], Job]) -> None:
    p = plain(getattr(params, task).train)
    cfg = LoopConfig.from_params(getattr(params, task).train)
    if relaunch_under_torchrun(cfg.nproc, "stages", ["train", task]):
        return
    out_dir, live_dir = layout.model_dir(task), layout.train_log(task)
    rt = setup(cfg.device)
    try:
        seed_everything(params.seed, rt.rank)
        job = make_job(params)
        ckpt_dir = out_dir / "checkpoints"
        # A pinned run's checkpoint is no unpinned run's (other kernels, threads, precision).
        run = {"train": p, "seed": params.seed, "reproducible": params.reproducible}
        fp = fingerprint(run, job.data_files, rt.world_size)
        live = None
        if rt.is_main:
            from dvclive import Live

            # Never DVCLive's resume (it appends to whatever a killed run left, torn or not):
            # start the folder afresh; a resumed fit() rewrites the earlier epochs from last.pt.
            live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
            live.log_params({f"{task}.train": p, "seed": params.seed, "world_size": rt.world_size})
        pointer = params.tune.trial
        try:
            summary = fit(
                job.model,
                job.train_set,
                job.val_set,
                sums_fn=job.sums_fn,
                cfg=cfg,
                rt=rt,
                seed=params.seed,
                ckpt_dir=ckpt_dir,
                fingerprint=fp,
                live=live,
                on_epoch=pruning_callback(pointer, rt),
            )
        except Pruned as e:
            # last.pt holds the loop state of the epoch that was pruned (written before on_epoch).
            state = load_checkpoint(ckpt_dir / "last.pt")["state"]
            summary = {
                "best_epoch": state["best_epoch"] + 1,
                "epochs_run": state["epoch"],
                "stopped_early": True,
                "best_metrics": state["best_metrics"],
                "pruned": True,
            }
            if rt.is_main:
                log(f"pruned by the tune study after epoch {e}")
        if rt.is_main and pointer:
            live.summary["tune"] = {
                "trial": int(pointer.rsplit(":", 1)[1]),
                "state": "pruned" if summary.get("pruned") else "complete",
                "best": summary["best_metrics"],
                "epochs_run": summary["epochs_run"],
            }
        if rt.is_main:
            best = load_checkpoint(ckpt_dir / "best.pt")
            meta = Meta.model_validate(
                {
                    "task": task,
                    "arch": job.arch,
                    **job.meta,
                    "train": summary,
                    "params": {"seed": params.seed, f"{task}.train": p},
                }
            )
            save_checkpoint(
                out_dir / layout.MODEL_PT_FILE, {"state_dict": best["model"], "meta": meta.dump()}
            )
            live.end()
            log(
                f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: "
                + " ".join(f"{k}={v:.4g}" for k, v in summary["best_metrics"].items())
                + f" → {out_dir / layout.MODEL_PT_FILE}"
            )
    finally:
        teardown()
