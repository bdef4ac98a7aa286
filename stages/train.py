"""train: fit the task's torch model with the shared loop (stages/trainer.py).

    python -m stages.train tabular     # one process, or <task>.train.nproc under torchrun
    torchrun --nproc-per-node=2 -m stages.train image   # the same, launched by hand

Outputs: models/<task>/model.pt (best weights + everything needed to rebuild and
serve them), metrics/<task>/train/ (DVCLive, rank 0 only), and the scratch folder
models/<task>/checkpoints/ (full state for resume; kept between runs).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, TensorDataset

from stages.common import StageError, atomic_path, log, read_json, run_stage
from stages.distributed import relaunch_under_torchrun, seed_everything, setup, teardown
from stages.image import load_rgb, normalise
from stages.models import build_model
from stages.tabular import Preprocessor
from stages.trainer import LoopConfig, classification_sums, fit, load_checkpoint, regression_sums


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


def tabular_tensors(df: pd.DataFrame, pre: Preprocessor, schema: dict, scaling: dict | None) -> TensorDataset:
    x = torch.from_numpy(pre.transform(df))
    target = df[schema["target"]]
    if schema["task"] == "classification":
        y = torch.from_numpy(pd.Categorical(target, categories=schema["classes"]).codes.astype(np.int64))
    else:
        y = torch.from_numpy(((target.to_numpy("float64") - scaling["mean"]) / scaling["std"]).astype(np.float32))
    return TensorDataset(x, y)


def tabular_job(params: dict) -> Job:
    p = params["tabular"]["train"]
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
    return Job(build_model(arch), arch, tabular_tensors(train_df, pre, schema, scaling),
               tabular_tensors(val_df, pre, schema, scaling),
               classification_sums if schema["task"] == "classification" else regression_sums,
               [prepared / "train.parquet", prepared / "val.parquet"],
               {"preprocessor": pre.to_dict(), "schema": schema, "target_scaling": scaling})


class ImageSet(Dataset):
    """Images decoded by the serving code (load_rgb, normalise); augmentation in between."""

    def __init__(self, paths: list[Path], labels: np.ndarray, schema: dict, augment: dict | None):
        self.paths, self.labels, self.schema = paths, torch.from_numpy(labels), schema
        self.augment = None
        if augment:
            from torchvision.transforms import v2

            ops = [v2.RandomAffine(degrees=augment["rotate"], translate=(augment["translate"],) * 2,
                                   scale=tuple(augment["scale"]))]
            if augment["hflip"]:
                ops.append(v2.RandomHorizontalFlip())
            self.augment = v2.Compose(ops)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rgb = load_rgb(self.paths[i], self.schema["image_size"])
        if self.augment is not None:
            rgb = self.augment(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        x = normalise(rgb[None], self.schema["mean"], self.schema["std"])[0]
        return torch.from_numpy(x), self.labels[i]


def image_job(params: dict) -> Job:
    p = params["image"]["train"]
    prepared = Path("data/prepared/image")
    schema = read_json(prepared / "schema.json")
    index = pd.read_parquet(prepared / "index.parquet")
    root = Path(schema["root"])

    def subset(split: str, augment: dict | None) -> ImageSet:
        rows = index[index["split"] == split]
        labels = pd.Categorical(rows["label"], categories=schema["classes"]).codes.astype(np.int64)
        return ImageSet([root / p for p in rows.index], labels, schema, augment)

    arch = {"kind": p["arch"], "num_classes": len(schema["classes"])}
    return Job(build_model(arch, pretrained=p["pretrained"]), arch, subset("train", p["augment"]), subset("val", None),
               classification_sums, [prepared / "index.parquet"], {"schema": schema})


def train(task: str, params: dict, make_job: Callable[[dict], Job]) -> None:
    p = params[task]["train"]
    cfg = LoopConfig.from_params(p, f"{task}.train")
    if relaunch_under_torchrun(cfg.nproc, "stages.train", [task]):
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
            with atomic_path(out_dir / "model.pt") as tmp:
                torch.save({"state_dict": best["model"], "meta": meta}, tmp)
            live.end()
            log(f"best epoch {summary['best_epoch']} of {summary['epochs_run']}: "
                + " ".join(f"{k}={v:.4g}" for k, v in summary["best_metrics"].items()) + f" → {out_dir}/model.pt")
    finally:
        teardown()


def train_tabular(params: dict) -> None:
    train("tabular", params, tabular_job)


def train_image(params: dict) -> None:
    train("image", params, image_job)


def train_detect(params: dict, out_dir: Path = Path("models/detect"),
                 live_dir: Path = Path("metrics/detect/train")) -> dict:
    """Ultralytics trains (its own loop, AMP and multi-GPU DDP); we keep the data view,
    the settings, the weights and the DVCLive log in our hands."""
    from stages import yolo

    p = params["detect"]["train"]
    yolo.configure()
    from dvclive import Live
    from ultralytics import YOLO

    names = read_json("data/prepared/detect/dataset.json")["names"]
    data = yolo.dataset_view(names)
    runs = yolo.run_dir("train")
    weights = p["model"].endswith(".pt")
    if weights and not Path(p["model"]).is_file():
        raise StageError(f"detect.train.model: {p['model']}: no such file (a .yaml trains from scratch)")
    model = YOLO(p["model"])
    model.train(data=str(data), epochs=p["epochs"], imgsz=p["imgsz"], batch=p["batch"], optimizer=p["optimizer"],
                lr0=p["lr0"],
                patience=p["patience"], device=yolo.device(p["device"]), workers=p["workers"], amp=p["amp"],
                seed=params["seed"], deterministic=True, pretrained=weights, project=str(runs.parent),
                name=runs.name, exist_ok=True, plots=False, verbose=False)
    # Ultralytics' DDP runs in child processes; only this (rank 0) process gets here.
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
    live.log_params({"detect.train": p, "seed": params["seed"]})
    yolo.results_to_live(runs / "results.csv", live)
    live.end()
    with atomic_path(out_dir / "model.pt") as tmp:
        shutil.copy2(runs / "weights" / "best.pt", tmp)
    log(f"trained {p['model']} for {p['epochs']} epochs → {out_dir}/model.pt")
    return {"run": str(runs)}


if __name__ == "__main__":
    run_stage({"tabular": train_tabular, "image": train_image, "detect": train_detect})
