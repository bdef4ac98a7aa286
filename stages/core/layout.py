"""The repository layout: where each stage reads and writes, every path that dvc.yaml also
names, written once.

dvc.yaml's templates (`data/prepared/${key}`, `models/${key}/model.onnx`, ...) mirror these
functions; tests/test_layout.py checks that every dep and out of dvc.yaml's stages is one of
them (or a params.yaml key, or code), that no other module under stages/ spells one, and
that no module under stages/, app/ or tools/ spells one of the file names below (code that
writes into a temporary folder, or reads another root, joins the same name).
Paths are relative to the repository root, where dvc runs the stages. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

# The file names, each spelled here only.
MODEL_PT_FILE = "model.pt"  # train: weights and the meta that evaluate and export read
MODEL_ONNX_FILE = "model.onnx"
CARD_FILE = "model.json"  # the model card
COLUMNS_FILE = "columns.json"  # prepare: what the data's columns (or images, boxes) are
METRICS_FILE = "metrics.json"  # evaluate's test metrics (DVCLive's own file has this name too)
VALIDATION_FILE = "validation.json"
INFER_STATS_FILE = "infer.json"
LABEL_ISSUES_FILE = "label_issues.csv"
LABEL_ISSUE_COUNTS_FILE = "label_issues.json"
BOOSTING_FILE = "boosting.joblib"  # boost: the gradient boosting model (tabular)
ENSEMBLE_FILE = "ensemble.json"  # boost: members, weights and why (tabular)

# The demo stage's outputs (tabular's demo data is a file in git: tabular.data.source).
DEMO = {"image": Path("data/demo/digits"), "detect": Path("data/demo/shapes")}
# infer's outputs where params.yaml does not name them (tabular: tabular.infer.output).
PREDICTIONS = {
    "image": Path("data/predictions/image.csv"),
    "detect": Path("data/predictions/detect.json"),
}
# Not a DVC output: boxes drawn on the first detect.infer.render images.
RENDERED = Path("data/predictions/detect_rendered")
# Not a DVC output either: image infer's class activation maps (image.infer.heatmaps).
HEATMAPS = Path("data/predictions/image_heatmaps")


def prepared(task: str) -> Path:
    """prepare's output folder: the splits and what describes them."""
    return Path("data/prepared") / task


def columns(task: str) -> Path:
    """prepare's description of the prepared data (stages/core/documents.py Columns for
    tabular, ImageIndex for image)."""
    return prepared(task) / COLUMNS_FILE


def expectations(task: str) -> Path:
    """The committed GX suites (one per data source)."""
    return Path("data/expectations") / task


def model_dir(task: str, root: str | Path = "models") -> Path:
    """models/<task>, or <root>/<task> for another folder of models (the app's, a registry's)."""
    return Path(root) / task


def model_pt(task: str) -> Path:
    """train's output: weights and the meta evaluate and export read."""
    return model_dir(task) / MODEL_PT_FILE


def boosting(task: str) -> Path:
    """boost's gradient boosting model (scikit-learn, joblib); tabular only."""
    return model_dir(task) / BOOSTING_FILE


def ensemble(task: str) -> Path:
    """boost's members, weights and why (the card's `ensemble` section); tabular only."""
    return model_dir(task) / ENSEMBLE_FILE


def model_onnx(task: str, root: str | Path = "models") -> Path:
    return model_dir(task, root) / MODEL_ONNX_FILE


def card(task: str, root: str | Path = "models") -> Path:
    """export's model card, which infer and serving read."""
    return model_dir(task, root) / CARD_FILE


def metrics_dir(task: str) -> Path:
    return Path("metrics") / task


def validation(task: str) -> Path:
    """validate's report (train runs only after it)."""
    return metrics_dir(task) / VALIDATION_FILE


def datadocs(task: str) -> Path:
    """GX Data Docs: written by validate, no DVC output (they carry run times)."""
    return metrics_dir(task) / "datadocs"


def train_log(task: str) -> Path:
    """train's DVCLive folder (persisted between runs)."""
    return metrics_dir(task) / "train"


def metrics(task: str) -> Path:
    """evaluate's test metrics."""
    return metrics_dir(task) / METRICS_FILE


def plots(task: str) -> Path:
    return metrics_dir(task) / "plots"


# Not a DVC output (dvc.yaml lists it under its top-level `metrics`): tabular evaluate's
# wall times, train stage and HGB fit, which differ run to run.
COST = Path("metrics/tabular/cost.json")
# Also written by tabular evaluate, beside metrics.json, and no stage output for the same
# reason as COST's neighbour: evaluate is one foreach over the tasks and only tabular has it.
# Permutation importance per column (stages/tabular/explain.py); seeded, so it reproduces.
IMPORTANCE = Path("metrics/tabular/importance.json")


def label_issues(task: str) -> Path:
    """the labels stage's list of suspected label errors."""
    return metrics_dir(task) / LABEL_ISSUES_FILE


def label_issue_counts(task: str) -> Path:
    """the labels stage's summary: count, share, rows, folds."""
    return metrics_dir(task) / LABEL_ISSUE_COUNTS_FILE


def infer_stats(task: str) -> Path:
    """infer's throughput and the inputs it could not read."""
    return metrics_dir(task) / INFER_STATS_FILE
