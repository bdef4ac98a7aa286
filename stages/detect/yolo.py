"""Ultralytics YOLO, kept inside the repo and on a short leash.

- Settings, weights and runs live in .cache/ (git- and DVC-ignored), never in $HOME,
  so queued experiments (each in its own copy of the repo) don't share or leak them.
- Its integrations are off: its DVCLive callback (we log through our own DVCLive),
  Platform sync and the rest; auto-install of missing packages is off too; weights load
  through its safe (weights_only) loader.
- It reads a data.yaml with an absolute `path:` written at run time into .cache/, over a
  view of data/prepared/detect made of symlinks, so its label caches (written beside the
  labels folder) land in .cache/ and not inside the DVC-tracked output.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

CACHE = Path(".cache")


def configure() -> None:
    """Call before importing ultralytics: its settings file is read at import."""
    cfg = (CACHE / "ultralytics").resolve()
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    os.environ["YOLO_AUTOINSTALL"] = "false"
    # Checkpoints load with torch.load(weights_only=True) and an allow-list of model classes.
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    from ultralytics import settings

    settings.update({"sync": False, "dvc": False, "clearml": False, "comet": False, "mlflow": False,
                     "raytune": False, "tensorboard": False, "wandb": False, "vscode_msg": False,
                     "datasets_dir": str(cfg / "datasets"), "weights_dir": str(cfg / "weights"),
                     "runs_dir": str(cfg / "runs")})


def dataset_view(names: list[str], prepared: Path = Path("data/prepared/detect")) -> Path:
    """data.yaml over symlinks to the prepared files; returns its absolute path.

    The split folders are real folders of per-file links, not links to the prepared
    folders: Ultralytics resolve()s the split paths of data.yaml, so with a linked folder
    it wrote its label cache (labels/<split>.cache) into data/prepared/detect itself, and
    `dvc status` then reported prepare's output as modified after every train/evaluate."""
    view = (CACHE / "detect" / "dataset").resolve()
    shutil.rmtree(view, ignore_errors=True)
    for kind in ("images", "labels"):
        for split in ("train", "val", "test"):
            (view / kind / split).mkdir(parents=True)
            source = (prepared / kind / split).resolve()
            for f in sorted(source.iterdir()) if source.is_dir() else []:
                (view / kind / split / f.name).symlink_to(f)
    data = view / "data.yaml"
    data.write_text(f"path: {view}\ntrain: images/train\nval: images/val\ntest: images/test\nnames:\n"
                    + "".join(f"  {i}: {n!r}\n" for i, n in enumerate(names)))
    return data


def run_dir(name: str) -> Path:
    """A fresh Ultralytics project/name folder under .cache/detect/runs."""
    path = (CACHE / "detect" / "runs" / name).resolve()
    shutil.rmtree(path, ignore_errors=True)
    return path


def device(choice: str) -> str:
    """auto → the first GPU when there is one, else cpu; anything else goes to Ultralytics as is
    ("cpu", "0", "0,1" for DDP over two GPUs)."""
    if str(choice) != "auto":
        return str(choice)
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def results_to_live(results_csv: Path, live) -> None:
    """Log Ultralytics' per-epoch results.csv through our DVCLive: losses, precision,
    recall, mAP50, mAP50-95 and learning rate, one step per epoch."""
    import csv

    rename = {"metrics/precision(B)": "precision", "metrics/recall(B)": "recall", "metrics/mAP50(B)": "mAP50",
              "metrics/mAP50-95(B)": "mAP50-95", "lr/pg0": "lr"}
    with open(results_csv) as f:
        for row in csv.DictReader(f):
            row = {k.strip(): v for k, v in row.items()}
            live.step = int(float(row["epoch"])) - 1
            for key, value in row.items():
                name = rename.get(key) or (key.replace("/", "_") if key.startswith(("train/", "val/")) else None)
                if name:
                    live.log_metric(name, float(value))
            live.next_step()


def reproducible_weights(src: Path, dst: Path) -> None:
    """Copy Ultralytics' final weights without what changes on every run or in every clone:
    the save date, git details, elapsed times in the per-epoch results, and absolute paths
    in train_args (where the repo happens to be). The weights and every setting that shaped
    them stay, so two identical runs write identical bytes (dvc.lock does not churn)."""
    import io

    import torch
    from ultralytics.nn.tasks import torch_safe_load

    from stages.core.common import atomic_path

    ckpt, _ = torch_safe_load(str(src))
    ckpt = {k: v for k, v in ckpt.items() if k not in ("date", "git")}
    results = ckpt.get("train_results")
    if isinstance(results, dict):
        ckpt["train_results"] = {k: v for k, v in results.items() if k != "time"}
    here = Path.cwd().resolve()

    def relative(args: dict) -> dict:
        return {k: os.path.relpath(v, here) if isinstance(v, str) and Path(v).is_absolute()
                and Path(v).resolve().is_relative_to(here) else v for k, v in args.items()}

    ckpt["train_args"] = relative(ckpt.get("train_args", {}))
    model = ckpt.get("model")
    if isinstance(getattr(model, "args", None), dict):  # the model keeps its own copy of the args
        model.args = relative(model.args)
    buffer = io.BytesIO()  # a buffer, not the temporary file: torch names the archive after the file
    torch.save(ckpt, buffer)
    with atomic_path(dst) as tmp:
        tmp.write_bytes(buffer.getbuffer())
