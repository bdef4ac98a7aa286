"""prepare: YOLO, COCO or Pascal VOC labels → one YOLO layout (images/ and labels/ per
split) in data/prepared/detect/, plus the per-image and per-box tables validation checks.

    python -m stages prepare detect
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from stages.core import layout
from stages.core.cli import StageError, log
from stages.core.files import atomic_dir, write_json
from stages.core.schema import Params, plain
from stages.core.splits import split_keys
from stages.detect.boxformats import (
    coco_to_yolo,
    label_tables,
    parse_yolo_label,
    read_yolo,
    voc_to_yolo,
)


def run(params: Params, out_dir: str | Path = layout.prepared("detect")) -> dict:
    """Any of YOLO, COCO, VOC → one YOLO layout (images/ and labels/ per split), plus the
    per-image and per-box tables that validation checks. Splits are made anew by seed."""
    p = params.detect.data
    fmt, source = p.format, Path(p.source)
    with tempfile.TemporaryDirectory() as converted:
        converted = Path(converted)
        orphans: list[str] = []
        difficult = 0
        if fmt == "yolo":
            images, labels, names, orphans = read_yolo(source)
        else:
            if fmt == "coco":
                if not source.is_file():
                    raise StageError(f"{source}: no such COCO annotations file")
                images_dir = Path(p.images) if p.images else source.parent / "images"
                images, names = coco_to_yolo(source, images_dir, converted)
            else:
                images, names, difficult = voc_to_yolo(source, converted)
            labels = {
                k: parse_yolo_label(converted / f"{k}.txt")
                for k in images
                if (converted / f"{k}.txt").is_file()
            }
        if not images:
            raise StageError(f"{source}: the dataset has no images")
        image_table, box_table = label_tables(images, labels, names, orphans)
        keys = [k for k in image_table.index if image_table.loc[k, "has_image"]]
        split_of = split_keys(keys, p.split.val, p.split.test, params.seed, str(source))
        image_table["split"] = [split_of.get(k, "none") for k in image_table.index]
        box_table["split"] = box_table["image"].map(split_of)
        with atomic_dir(out_dir) as tmp:
            for key, split_name in split_of.items():
                flat = key.replace("/", "__")
                for folder in ("images", "labels"):
                    (tmp / folder / split_name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(
                    images[key], tmp / "images" / split_name / f"{flat}{images[key].suffix.lower()}"
                )
                (tmp / "labels" / split_name / f"{flat}.txt").write_text(
                    "".join(r["text"] + "\n" for r in labels.get(key, []))
                )
            image_table.to_parquet(tmp / "images.parquet")
            box_table.to_parquet(tmp / "boxes.parquet")
            counts = box_table["class_name"].value_counts()
            schema = {
                "source": str(source),
                "format": fmt,
                "names": names,
                "rows": image_table["split"].value_counts().to_dict(),
                "boxes_per_class": {n: int(counts.get(n, 0)) for n in names},
                **({"voc_difficult_left_out": difficult} if fmt == "voc" else {}),
                "params": {"seed": params.seed, "detect.data": plain(p)},
            }
            write_json(tmp / "dataset.json", schema)
    log(
        f"prepared {len(keys)} images, {len(box_table)} boxes, {len(names)} classes from {source} ({fmt}): "
        + ", ".join(f"{k} {v}" for k, v in schema["rows"].items())
        + f" → {out_dir}"
    )
    return schema
