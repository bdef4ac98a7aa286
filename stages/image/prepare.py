"""prepare: an image folder or manifest → an index of every image (size, mode, bytes,
content hash, decode error), split stratified by label, with split manifests.

    python -m stages prepare image
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from stages.core import layout
from stages.core.cli import StageError, log
from stages.core.documents import ImageIndex
from stages.core.files import atomic_dir
from stages.core.images import inspect_image, list_images
from stages.core.schema import Params, plain
from stages.core.splits import split
from stages.image.labels import exclude


def index_images(table: pd.DataFrame, root) -> pd.DataFrame:
    """Add width, height, mode, bytes, sha256 and error (None if it decodes) per image."""
    info = pd.DataFrame([inspect_image(root / p) for p in table["path"]], index=table.index)
    return pd.concat([table, info], axis=1)


def run(params: Params, out_dir: str | Path = layout.prepared("image")) -> ImageIndex:
    """Index every image (size, mode, bytes, content hash, decode error), split stratified
    by label, and flag files that occur in two splits (a leak)."""
    p = params.image.data
    table, root = list_images(p.source)
    table = exclude(table, p.exclude, p.source)
    classes = sorted(table["label"].unique())
    if len(classes) < 2:
        raise StageError(
            f"{p.source}: one class ({classes[0]!r}); classification needs at least two"
        )
    index = index_images(table, root)
    parts = split(
        index,
        "label",
        "classification",
        p.split.val,
        p.split.test,
        params.seed,
        p.source,
    )
    index = pd.concat([part.assign(split=name) for name, part in parts.items()])
    leak = index.groupby("sha256")["split"].transform("nunique") > 1
    if leak.any() and p.duplicates == "drop":
        first = index["split"].map({"train": 0, "val": 1, "test": 2})
        keep = first == first.groupby(index["sha256"]).transform("min")
        log(
            f"warning: dropped {int((~keep).sum())} images whose identical copy is in an earlier split "
            "(image.data.duplicates: drop)"
        )
        index = index[keep]
        leak = index.groupby("sha256")["split"].transform("nunique") > 1
    index["dup_across_splits"] = leak
    index["class_count"] = index.groupby("label")["label"].transform("size")
    index = index.set_index("path").sort_index()
    schema = ImageIndex(
        source=p.source,
        root=str(root),
        classes=classes,
        image_size=p.image_size,
        mean=p.mean,
        std=p.std,
        rows=index["split"].value_counts().to_dict(),
        params={"seed": params.seed, "image.data": plain(p)},
    )
    with atomic_dir(out_dir) as tmp:
        index.to_parquet(tmp / "index.parquet")
        for name in parts:
            # Manifests for `infer` and for people: paths relative to the manifest itself.
            rel = [
                os.path.relpath(root / path, out_dir)
                for path in index.index[index["split"] == name]
            ]
            pd.DataFrame(
                {"path": rel, "label": index.loc[index["split"] == name, "label"].to_numpy()}
            ).to_csv(tmp / f"{name}.csv", index=False)
        schema.write(tmp / layout.columns("image").name)
    log(
        f"prepared {len(index)} images in {len(classes)} classes from {p.source}: "
        + ", ".join(f"{k} {v}" for k, v in schema.rows.items())
        + f" → {out_dir}"
    )
    return schema
