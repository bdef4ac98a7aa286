"""prepare: raw data → typed train/val/test splits under data/prepared/<task>/.

    python -m stages.prepare tabular
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import StageError, atomic_dir, log, run_stage, write_json
from stages.detect import FORMATS, coco_to_yolo, label_tables, parse_yolo_label, read_yolo, voc_to_yolo
from stages.image import index_images, list_images
from stages.tabular import check_target, normalise_columns, read_csv, split

DUPLICATE_POLICIES = ("fail", "drop")


def prepare_tabular(params: dict, out_dir: str = "data/prepared/tabular") -> dict:
    p = params["tabular"]["data"]
    source, target, task = p["source"], p["target"], p["task"]
    raw = read_csv(source)
    unknown = [c for c in p["drop_columns"] if c not in raw.columns]
    if unknown:
        log(f"warning: tabular.data.drop_columns names columns not in {source}: {', '.join(unknown)}")
    raw = raw.drop(columns=[c for c in p["drop_columns"] if c in raw.columns])
    if target in raw.columns and task == "classification":
        # Class labels are names, even when they look like numbers (0/1, 1..5).
        raw[target] = raw[target].map(lambda v: v if v != v else str(v).strip())
    check_target(raw, target, task, source)
    df, kinds = normalise_columns(raw, source, p["max_categories"])
    check_target(df, target, task, source)
    kinds.pop(target)
    splits = split(df, target, task, p["split"]["val"], p["split"]["test"], params["seed"], source)
    schema = {
        "source": source,
        "target": target,
        "task": task,
        "features": [{"name": c, "type": k} for c, k in kinds.items()],
        "classes": sorted(df[target].unique().tolist()) if task == "classification" else None,
        "rows": {name: len(part) for name, part in splits.items()},
        "params": {"seed": params["seed"], "tabular.data": p},
    }
    with atomic_dir(out_dir) as tmp:
        for name, part in splits.items():
            part.to_parquet(tmp / f"{name}.parquet")
        write_json(tmp / "schema.json", schema)
    log(f"prepared {source}: " + ", ".join(f"{k} {v} rows" for k, v in schema["rows"].items()) + f" → {out_dir}")
    return schema


def prepare_image(params: dict, out_dir: str = "data/prepared/image") -> dict:
    """Index every image (size, mode, bytes, content hash, decode error), split stratified
    by label, and flag files that occur in two splits (a leak)."""
    p = params["image"]["data"]
    if p["duplicates"] not in DUPLICATE_POLICIES:
        raise StageError(f"image.data.duplicates is {p['duplicates']!r}; choose one of: {', '.join(DUPLICATE_POLICIES)}")
    table, root = list_images(p["source"])
    classes = sorted(table["label"].unique())
    if len(classes) < 2:
        raise StageError(f"{p['source']}: one class ({classes[0]!r}); classification needs at least two")
    index = index_images(table, root)
    parts = split(index, "label", "classification", p["split"]["val"], p["split"]["test"], params["seed"], p["source"])
    index = pd.concat([part.assign(split=name) for name, part in parts.items()])
    leak = index.groupby("sha256")["split"].transform("nunique") > 1
    if leak.any() and p["duplicates"] == "drop":
        first = index["split"].map({"train": 0, "val": 1, "test": 2})
        keep = first == first.groupby(index["sha256"]).transform("min")
        log(f"warning: dropped {int((~keep).sum())} images whose identical copy is in an earlier split "
            "(image.data.duplicates: drop)")
        index = index[keep]
        leak = index.groupby("sha256")["split"].transform("nunique") > 1
    index["dup_across_splits"] = leak
    index["class_count"] = index.groupby("label")["label"].transform("size")
    index = index.set_index("path").sort_index()
    schema = {"source": p["source"], "root": str(root), "classes": classes, "image_size": p["image_size"],
              "mean": p["mean"], "std": p["std"], "rows": index["split"].value_counts().to_dict(),
              "params": {"seed": params["seed"], "image.data": p}}
    with atomic_dir(out_dir) as tmp:
        index.to_parquet(tmp / "index.parquet")
        for name in parts:
            # Manifests for `infer` and for people: paths relative to the manifest itself.
            rel = [os.path.relpath(root / path, out_dir) for path in index.index[index["split"] == name]]
            pd.DataFrame({"path": rel, "label": index.loc[index["split"] == name, "label"].to_numpy()}) \
                .to_csv(tmp / f"{name}.csv", index=False)
        write_json(tmp / "schema.json", schema)
    log(f"prepared {len(index)} images in {len(classes)} classes from {p['source']}: "
        + ", ".join(f"{k} {v}" for k, v in schema["rows"].items()) + f" → {out_dir}")
    return schema


def prepare_detect(params: dict, out_dir: str = "data/prepared/detect") -> dict:
    """Any of YOLO, COCO, VOC → one YOLO layout (images/ and labels/ per split), plus the
    per-image and per-box tables that validation checks. Splits are made anew by seed."""
    import shutil
    import tempfile

    p = params["detect"]["data"]
    fmt, source = p["format"], Path(p["source"])
    if fmt not in FORMATS:
        raise StageError(f"detect.data.format is {fmt!r}; choose one of: {', '.join(FORMATS)}")
    with tempfile.TemporaryDirectory() as converted:
        converted = Path(converted)
        orphans: list[str] = []
        if fmt == "yolo":
            images, labels, names, orphans = read_yolo(source)
        else:
            if fmt == "coco":
                if not source.is_file():
                    raise StageError(f"{source}: no such COCO annotations file")
                images_dir = Path(p["images"]) if p["images"] else source.parent / "images"
                images, names = coco_to_yolo(source, images_dir, converted)
            else:
                images, names = voc_to_yolo(source, converted)
            labels = {k: parse_yolo_label(converted / f"{k}.txt") for k in images if (converted / f"{k}.txt").is_file()}
        if not images:
            raise StageError(f"{source}: the dataset has no images")
        image_table, box_table = label_tables(images, labels, names, orphans)
        keys = [k for k in image_table.index if image_table.loc[k, "has_image"]]
        split_of = split_keys(keys, p["split"]["val"], p["split"]["test"], params["seed"], str(source))
        image_table["split"] = [split_of.get(k, "none") for k in image_table.index]
        box_table["split"] = box_table["image"].map(split_of)
        with atomic_dir(out_dir) as tmp:
            for key, split_name in split_of.items():
                flat = key.replace("/", "__")
                for kind in ("images", "labels"):
                    (tmp / kind / split_name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(images[key], tmp / "images" / split_name / f"{flat}{images[key].suffix.lower()}")
                (tmp / "labels" / split_name / f"{flat}.txt").write_text(
                    "".join(r["text"] + "\n" for r in labels.get(key, [])))
            image_table.to_parquet(tmp / "images.parquet")
            box_table.to_parquet(tmp / "boxes.parquet")
            counts = box_table["class_name"].value_counts()
            schema = {"source": str(source), "format": fmt, "names": names,
                      "rows": image_table["split"].value_counts().to_dict(),
                      "boxes_per_class": {n: int(counts.get(n, 0)) for n in names},
                      "params": {"seed": params["seed"], "detect.data": p}}
            write_json(tmp / "dataset.json", schema)
    log(f"prepared {len(keys)} images, {len(box_table)} boxes, {len(names)} classes from {source} ({fmt}): "
        + ", ".join(f"{k} {v}" for k, v in schema["rows"].items()) + f" → {out_dir}")
    return schema


def split_keys(keys: list[str], val: float, test: float, seed: int, source: str) -> dict[str, str]:
    """Random train/val/test assignment of image keys, fixed by seed (boxes of one image
    stay together; detection has no single label to stratify on)."""
    if len(keys) < 3:
        raise StageError(f"{source}: {len(keys)} images cannot be split into train, val and test")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    n_test, n_val = max(1, round(test * len(keys))), max(1, round(val * len(keys)))
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(keys) - n_test - n_val)
    return {keys[i]: names[j] for j, i in enumerate(order)}


if __name__ == "__main__":
    run_stage({"tabular": prepare_tabular, "image": prepare_image, "detect": prepare_detect})
