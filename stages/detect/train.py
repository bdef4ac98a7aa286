"""train: Ultralytics YOLO (its own loop, AMP and multi-GPU DDP) on the prepared data;
the data view, settings, weights and DVCLive log stay in our hands.

    python -m stages train detect
"""
from __future__ import annotations

from pathlib import Path

from stages.core.common import StageError, log, read_json
from stages.detect import yolo


def run(params: dict, out_dir: Path = Path("models/detect"),
        live_dir: Path = Path("metrics/detect/train")) -> dict:
    """Ultralytics trains (its own loop, AMP and multi-GPU DDP); we keep the data view,
    the settings, the weights and the DVCLive log in our hands."""
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
    yolo.reproducible_weights(runs / "weights" / "best.pt", out_dir / "model.pt")
    log(f"trained {p['model']} for {p['epochs']} epochs → {out_dir}/model.pt")
    return {"run": str(runs)}
