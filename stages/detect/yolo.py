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

import contextlib
import logging
import os
import shutil
from pathlib import Path

from stages.core import layout
from stages.core.cli import log

CACHE = Path(".cache")


def configure() -> None:
    """Call before importing ultralytics: its settings file is read at import."""
    cfg = (CACHE / "ultralytics").resolve()
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    os.environ["YOLO_AUTOINSTALL"] = "false"
    # Checkpoints load with torch.load(weights_only=True) and an allow-list of model classes.
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    from ultralytics import settings

    settings.update(
        {
            "sync": False,
            "dvc": False,
            "clearml": False,
            "comet": False,
            "mlflow": False,
            "raytune": False,
            "tensorboard": False,
            "wandb": False,
            "vscode_msg": False,
            "datasets_dir": str(cfg / "datasets"),
            "weights_dir": str(cfg / "weights"),
            "runs_dir": str(cfg / "runs"),
        }
    )
    from stages.core import numerics

    if numerics.pinned():
        # Ultralytics sets torch's threads to min(8, CPUs - 1) when it picks the CPU device
        # (select_device, read from this module-level name): the baseline's count instead,
        # else the sums' split follows the machine (stages/core/numerics.py).
        from ultralytics.utils import torch_utils

        torch_utils.NUM_THREADS = numerics.THREADS

    from ultralytics.utils import LOGGER

    # evaluate computes the COCO mAP with pycocotools itself (evaluate.coco_map). Ultralytics'
    # val(save_json=True) tries a second COCO pass through faster-coco-eval, which is not
    # installed, and warns twice that it is missing: nothing a user can act on, so dropped.
    LOGGER.addFilter(no_faster_coco_eval)  # a second call adds nothing: the same function


def no_faster_coco_eval(record: logging.LogRecord) -> bool:
    return "faster-coco-eval" not in record.getMessage()


@contextlib.contextmanager
def warnings_only():
    """Ultralytics' info lines and progress bars off for a while: its warnings stay, and so
    does the one line that says how much of a fine-tuning's weights were transferred
    ("Transferred 349/355 items from pretrained weights"), which a user starting from their
    own .pt needs. A filter, not the logger's level: a level above INFO would drop that line
    before any filter sees it. The bars follow ultralytics.utils.VERBOSE (read per bar)."""
    import ultralytics.utils as utils

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "Transferred" in record.getMessage()

    verbose = utils.VERBOSE
    utils.LOGGER.addFilter(keep)
    utils.VERBOSE = False
    try:
        yield
    finally:
        utils.LOGGER.removeFilter(keep)
        utils.VERBOSE = verbose


def dataset_view(names: list[str], prepared: Path = layout.prepared("detect")) -> Path:
    """data.yaml over symlinks to the prepared files; returns its absolute path.

    The split folders are real folders of per-file links, not links to the prepared
    folders: Ultralytics resolve()s the split paths of data.yaml, so with a linked folder
    it wrote its label cache (labels/<split>.cache) into data/prepared/detect itself, and
    `dvc status` then reported prepare's output as modified after every train/evaluate."""
    view = (CACHE / "detect" / "dataset").resolve()
    shutil.rmtree(view, ignore_errors=True)
    for folder in ("images", "labels"):
        for split in ("train", "val", "test"):
            (view / folder / split).mkdir(parents=True)
            source = (prepared / folder / split).resolve()
            for f in sorted(source.iterdir()) if source.is_dir() else []:
                (view / folder / split / f.name).symlink_to(f)
    data = view / "data.yaml"
    data.write_text(
        f"path: {view}\ntrain: images/train\nval: images/val\ntest: images/test\nnames:\n"
        + "".join(f"  {i}: {n!r}\n" for i, n in enumerate(names))
    )
    return data


def run_dir(name: str, fresh: bool = True) -> Path:
    """An Ultralytics project/name folder under .cache/detect/runs (emptied when fresh)."""
    path = (CACHE / "detect" / "runs" / name).resolve()
    if fresh:
        shutil.rmtree(path, ignore_errors=True)
    return path


def device(choice: str) -> str:
    """auto → the first GPU when there is one, else cpu; anything else goes to Ultralytics as is
    ("cpu", "0", "0,1" for DDP over two GPUs)."""
    if str(choice) != "auto":
        return str(choice)
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


RENAME = {
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "lr/pg0": "lr",
}


# What the epoch's log line shows (every column goes to DVCLive).
EPOCH_LINE = ("train_box_loss", "train_cls_loss", "precision", "recall", "mAP50", "mAP50-95")


def _log_row(live, step: int, row: dict) -> None:
    """One epoch of Ultralytics' results (its results.csv columns) as a DVCLive step: losses,
    precision, recall, mAP50, mAP50-95 and learning rate. Values are rounded as results.csv
    rounds them (6 significant digits), so rows rebuilt from a checkpoint on resume read
    the same as rows logged live."""
    live.step = step
    for key, value in row.items():
        name = RENAME.get(key) or (
            key.replace("/", "_") if key.startswith(("train/", "val/")) else None
        )
        if name:
            live.log_metric(name, float(f"{float(value):.6g}"))
    live.next_step()


def history_rows(train_results: dict) -> list[dict]:
    """A checkpoint's `train_results` (results.csv as columns) → one dict per epoch."""
    return (
        [
            dict(zip(train_results, values, strict=False))
            for values in zip(*train_results.values(), strict=False)
        ]
        if train_results
        else []
    )


class LiveLog:
    """Ultralytics callbacks that write metrics/detect/train as each epoch ends, so a run
    (a queued experiment too) can be watched in `dvc exp show` / `dvc plots` while it runs.

    Only rank 0 writes (RANK is unset in a single process, 0..N-1 in Ultralytics' DDP
    workers, which receive these callbacks pickled). The Live is opened on the first call
    in the writing process, afresh; a resumed run first writes the epochs its checkpoint
    holds (as the torch trainer does: DVCLive's own files may be torn by the kill).
    Ultralytics calls on_fit_epoch_end once more after training, for its final validation
    of best.pt; only calls preceded by on_train_epoch_start are epochs."""

    def __init__(self, live_dir: Path, params: dict, history: list[dict]):
        self.live_dir, self.params, self.history = str(live_dir), params, history
        self.live, self.in_epoch = None, False

    def epoch_start(self, trainer) -> None:
        self.in_epoch = True

    def epoch_end(self, trainer) -> None:
        if int(os.environ.get("RANK", "-1")) > 0 or not self.in_epoch:
            return
        self.in_epoch = False
        if self.live is None:
            from dvclive import Live

            self.live = Live(self.live_dir, dvcyaml=False, save_dvc_exp=False)
            self.live.log_params(self.params)
            for step, row in enumerate(self.history):
                _log_row(self.live, step, row)
        row = {
            **trainer.label_loss_items(trainer.tloss, prefix="train"),
            **trainer.metrics,
            **trainer.lr,
        }
        _log_row(self.live, trainer.epoch, row)
        # The epoch's line, as the torch trainer writes one (Ultralytics' own is off: train).
        named = {RENAME.get(k, k.replace("/", "_")): v for k, v in row.items()}
        log(
            f"epoch {trainer.epoch + 1}/{trainer.epochs} "
            + " ".join(f"{k}={float(named[k]):.4g}" for k in EPOCH_LINE if k in named)
        )

    def train_end(self, trainer) -> None:
        if self.live is not None:
            self.live.end()

    def attach(self, model) -> None:
        model.add_callback("on_train_epoch_start", self.epoch_start)
        model.add_callback("on_fit_epoch_end", self.epoch_end)
        model.add_callback("on_train_end", self.train_end)


def resume_point(run: Path, fingerprint: str, epochs: int) -> dict | None:
    """The checkpoint to resume from: run/weights/last.pt when it is an unfinished epoch of
    the run with this fingerprint (params, data, starting weights, world size). Otherwise
    None, and the run folder is emptied for a fresh start with this fingerprint.

    Ultralytics writes last.pt in place (a kill mid-write leaves it unreadable: then start
    afresh) and strips the optimizer when a run ends (then it is finished). A checkpoint of
    the last epoch is not resumed either (Ultralytics refuses: nothing left to train)."""
    stamp, last = run / "fingerprint.txt", run / "weights" / "last.pt"
    if stamp.is_file() and stamp.read_text() == fingerprint and last.is_file():
        from ultralytics.nn.tasks import torch_safe_load

        try:
            ckpt, _ = torch_safe_load(str(last))
        except Exception:  # noqa: BLE001 - a torn or foreign file: not resumable
            ckpt = {}
        if ckpt.get("optimizer") is not None and 0 <= ckpt.get("epoch", -1) < epochs - 1:
            # results.csv may hold a row past the checkpoint (written before last.pt): cut it
            # back to the checkpoint's own copy, or the resumed run would log that epoch twice.
            rows = history_rows(ckpt.get("train_results") or {})
            if rows:
                (run / "results.csv").write_text(
                    ",".join(rows[0])
                    + "\n"
                    + "".join(",".join(f"{v:.6g}" for v in r.values()) + "\n" for r in rows)
                )
            return ckpt
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    stamp.write_text(fingerprint)
    return None


def reproducible_weights(src: Path, dst: Path) -> None:
    """Copy Ultralytics' final weights without what changes on every run or in every clone:
    the save date, git details, elapsed times in the per-epoch results, and absolute paths
    in train_args (where the repo happens to be). The weights and every setting that shaped
    them stay, so two identical runs write identical bytes (dvc.lock does not churn)."""
    import io

    import torch
    from ultralytics.nn.tasks import torch_safe_load

    from stages.core.files import atomic_path

    ckpt, _ = torch_safe_load(str(src))
    ckpt = {k: v for k, v in ckpt.items() if k not in ("date", "git")}
    results = ckpt.get("train_results")
    if isinstance(results, dict):
        ckpt["train_results"] = {k: v for k, v in results.items() if k != "time"}
    here = Path.cwd().resolve()

    def relative(args: dict) -> dict:
        return {
            k: os.path.relpath(v, here)
            if isinstance(v, str)
            and Path(v).is_absolute()
            and Path(v).resolve().is_relative_to(here)
            else v
            for k, v in args.items()
        }

    ckpt["train_args"] = relative(ckpt.get("train_args", {}))
    model = ckpt.get("model")
    if isinstance(getattr(model, "args", None), dict):  # the model keeps its own copy of the args
        model.args = relative(model.args)
    buffer = (
        io.BytesIO()
    )  # a buffer, not the temporary file: torch names the archive after the file
    torch.save(ckpt, buffer)
    with atomic_path(dst) as tmp:
        tmp.write_bytes(buffer.getbuffer())
