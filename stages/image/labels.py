"""labels: suspected label errors among the images (stages/core/label_issues.py).

    python -m stages labels image   # → metrics/image/label_issues.csv and .json

Every prepared image (train, val and test) is held out once by a K-fold of a CNN
(`image.labels`: its own arch, small_cnn by default, and few epochs: a cheaper network of
the same kind as train's); cleanlab lists the images whose given class the held-out model
finds unlikely. `line` is the image's path relative to the source, the path
`image.data.exclude` takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import label_issues, layout
from stages.core.cli import StageError, log
from stages.core.files import read_json
from stages.core.schema import ImageLabels, Params


def exclude(table: pd.DataFrame, paths: list, source: str) -> pd.DataFrame:
    """prepare's image table without the paths of `image.data.exclude` (relative to the
    source, as label_issues.csv names them), before the split."""
    if not paths:
        return table
    unknown = sorted(set(map(str, paths)) - set(table["path"]))
    if unknown:
        raise StageError(
            f"image.data.exclude: {unknown[0]!r} is not an image of {source}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    log(f"excluded {len(set(paths))} images of {source} (image.data.exclude)")
    return table[~table["path"].isin(set(map(str, paths)))].reset_index(drop=True)


def fold_model(images: np.ndarray, labels: np.ndarray, schema: dict, p: ImageLabels, seed: int):
    """fit_predict for label_issues.out_of_fold: a fresh CNN per fold on normalised images."""
    import torch

    from stages.image.data import normalise
    from stages.image.model import build_model

    x = torch.from_numpy(normalise(np.asarray(images), schema["mean"], schema["std"]))
    y = torch.from_numpy(labels)
    arch = {"name": p.arch, "num_classes": len(schema["classes"])}

    def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        torch.manual_seed(seed)  # the fold's initial weights: outputs reproduce byte for byte
        model = label_issues.fit_network(
            build_model(arch), x[train], y[train], p.epochs, p.batch_size, p.lr, seed
        )
        return label_issues.predict_proba(model, x[held], p.batch_size)

    return fit_predict


def find(index: pd.DataFrame, schema: dict, p: ImageLabels, seed: int) -> pd.DataFrame:
    """The pure core: the suspected errors of prepare's image index (path → label)."""
    from stages.image.train import decoded_images

    classes = schema["classes"]
    labels = pd.Categorical(index["label"], categories=classes).codes.astype(np.int64)
    images = decoded_images([Path(schema["root"]) / f for f in index.index], schema["image_size"])
    fit_predict = fold_model(images, labels, schema, p, seed)
    probs = label_issues.out_of_fold(labels, len(classes), p.folds, seed, fit_predict)
    return label_issues.find(index.index.tolist(), labels, probs, classes)


def run(
    params: Params,
    prepared: Path = layout.prepared("image"),
    out: Path = layout.label_issues("image"),
) -> dict:
    p = params.image.labels
    schema = read_json(Path(prepared) / layout.COLUMNS_FILE)
    index = pd.read_parquet(Path(prepared) / "index.parquet")
    issues = find(index, schema, p, params.seed)
    summary = label_issues.write(issues, len(index), {"folds": p.folds}, Path(out))
    label_issues.report(Path(out), issues, summary)
    return summary
