"""train: Ultralytics YOLO (its own loop, AMP and multi-GPU DDP) on the prepared data;
the data view, settings, weights and DVCLive log stay in our hands.

    python -m stages train detect

- Watched: metrics/detect/train (DVCLive) gets a row as each epoch ends (yolo.LiveLog).
- Resumed: a killed run continues from .cache/detect/runs/train/weights/last.pt when its
  fingerprint (params, prepared data, starting weights, world size) is this run's; any
  other run starts afresh.
- Fine-tuned: `detect.train.model` may be any local .pt (an earlier models/detect/model.pt
  copied aside, a registry version): its weights are transferred where the shapes match;
  with another class count, the class head starts fresh (Ultralytics' transfer).
"""

from __future__ import annotations

from pathlib import Path

from stages.core import layout
from stages.core.cli import StageError, log
from stages.core.files import read_json
from stages.core.schema import Params, plain
from stages.detect import yolo

PREPARED = layout.prepared("detect")


def run(
    params: Params,
    out_dir: Path = layout.model_dir("detect"),
    live_dir: Path = layout.train_log("detect"),
) -> dict:
    p = params.detect.train
    yolo.configure()
    from ultralytics import YOLO

    from stages.core.job import fingerprint

    weights = str(p.model).endswith(".pt")
    if weights and not Path(p.model).is_file():
        hint = (
            f" (dvc repro deletes {layout.model_pt('detect')} before training: copy it elsewhere and"
            " name the copy)"
            if Path(p.model) == out_dir / layout.MODEL_PT_FILE
            else ""
        )
        raise StageError(
            f"detect.train.model: {p.model}: no such file (a .yaml trains from scratch){hint}"
        )
    names = read_json(PREPARED / "dataset.json")["names"]
    data = yolo.dataset_view(names)
    device = yolo.device(p.device)
    world = len(device.split(",")) if device not in ("cpu", "mps") else 1
    files = [PREPARED / f for f in ("dataset.json", "images.parquet", "boxes.parquet")] + (
        [Path(p.model)] if weights else []
    )
    fp = fingerprint({"train": plain(p), "seed": params.seed}, files, world)
    runs = yolo.run_dir("train", fresh=False)
    ckpt = yolo.resume_point(runs, fp, p.epochs)
    live = yolo.LiveLog(
        live_dir,
        {"detect.train": plain(p), "seed": params.seed, "world_size": world},
        yolo.history_rows(ckpt["train_results"]) if ckpt else [],
    )
    # Ultralytics' info lines off (its warnings stay): its settings, every argument on one line
    # of 2,000 characters, the layer table, progress bars; LiveLog writes a line per epoch.
    with yolo.warnings_only():
        if ckpt:
            log(f"resuming from {runs / 'weights/last.pt'} after epoch {ckpt['epoch'] + 1}")
            model = YOLO(runs / "weights" / "last.pt")
            live.attach(model)
            # Everything else comes from the checkpoint's train_args; these are where it runs.
            model.train(resume=True, data=str(data), device=device, workers=p.workers)
        else:
            model = YOLO(p.model)
            live.attach(model)
            model.train(
                data=str(data),
                epochs=p.epochs,
                imgsz=p.imgsz,
                batch=p.batch,
                optimizer=p.optimizer,
                lr0=p.lr0,
                patience=p.patience,
                device=device,
                workers=p.workers,
                amp=p.amp,
                seed=params.seed,
                deterministic=True,
                pretrained=weights,
                project=str(runs.parent),
                name=runs.name,
                exist_ok=True,
                plots=False,
                verbose=False,
            )
    # Ultralytics' DDP runs in child processes; only this (rank 0) process gets here.
    yolo.reproducible_weights(runs / "weights" / "best.pt", out_dir / layout.MODEL_PT_FILE)
    log(f"trained {p.model} for {p.epochs} epochs → {out_dir / layout.MODEL_PT_FILE}")
    return {"run": str(runs)}
