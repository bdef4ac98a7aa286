"""Box formats, torch-free: YOLO, COCO and Pascal VOC labels read into one YOLO layout, and
the per-image and per-box tables that validation checks.

Boxes are YOLO-style throughout: class id and normalised centre x, y, width, height.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.cli import StageError
from stages.core.images import find_images, inspect_image


def yolo_line(cls: int, x: float, y: float, w: float, h: float) -> str:
    return f"{cls} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n"


def _images_under(folder: Path) -> dict[str, Path]:
    """{path relative to folder, without extension: file} for every image file below folder."""
    found: dict[str, Path] = {}
    for rel in find_images(folder):
        key = str(Path(rel).with_suffix("").as_posix())
        if key in found:  # cat.png and cat.jpg would share one label file
            raise StageError(
                f"{found[key]} and {folder / rel}: two images with one name; rename one"
            )
        found[key] = folder / rel
    return found


def parse_yolo_label(path: Path) -> list[dict]:
    """Every non-empty line of a YOLO label file, kept even when malformed (validation names it)."""
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        row = {
            "line": n,
            "fields": len(fields),
            "cls": np.nan,
            "x": np.nan,
            "y": np.nan,
            "w": np.nan,
            "h": np.nan,
            "text": line.strip(),
        }  # in full: prepare writes the label files from it (a cut line is a wrong box)
        if len(fields) == 5:
            try:
                row.update(zip(("cls", "x", "y", "w", "h"), map(float, fields), strict=False))
            except ValueError:
                row["fields"] = -1  # five fields, not all numbers
        rows.append(row)
    return rows


def read_yolo(source: Path) -> tuple[dict[str, Path], dict[str, list[dict]], list[str], list[str]]:
    """A data.yaml (its `path`, `names`) or a folder with images/ and labels/. Returns
    images {key: file}, labels {key: rows}, class names, and label files without an image."""
    import yaml

    names = None
    if source.is_file() and source.suffix in (".yaml", ".yml"):
        cfg = yaml.safe_load(source.read_text()) or {}
        root = Path(cfg.get("path") or ".")
        root = root if root.is_absolute() else source.parent / root
        names = cfg.get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        source = root
    if not (source / "images").is_dir() or not (source / "labels").is_dir():
        raise StageError(
            f"{source}: a YOLO dataset needs images/ and labels/ folders (or a data.yaml)"
        )
    if names is None:
        for candidate in (source / "data.yaml", source / "classes.txt"):
            if candidate.is_file():
                text = candidate.read_text()
                names = (
                    (yaml.safe_load(text) or {}).get("names")
                    if candidate.suffix == ".yaml"
                    else [n.strip() for n in text.splitlines() if n.strip()]
                )
                if isinstance(names, dict):
                    names = [names[k] for k in sorted(names)]
                break
    if not names:
        raise StageError(f"{source}: no class names (add data.yaml with `names:` or classes.txt)")
    images = _images_under(source / "images")
    label_files = {
        f.relative_to(source / "labels").with_suffix("").as_posix(): f
        for f in sorted((source / "labels").rglob("*.txt"))
    }
    labels = {k: parse_yolo_label(f) for k, f in label_files.items() if k in images}
    orphans = [str(f) for k, f in label_files.items() if k not in images]
    return images, labels, [str(n) for n in names], orphans


def coco_to_yolo(
    json_path: Path, images_dir: Path, out_labels: Path
) -> tuple[dict[str, Path], list[str]]:
    """Convert with Ultralytics' converter, after checking the JSON and renumbering the
    categories 1..K (Ultralytics maps category_id - 1 to the class id, which leaves gaps
    for any id scheme but COCO's own)."""
    import shutil
    import tempfile

    try:
        data = json.loads(json_path.read_text())
        cats = sorted(data["categories"], key=lambda c: c["id"])
        imgs = data["images"]
        anns = data["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise StageError(
            f"{json_path}: not a COCO detection JSON ({type(e).__name__}: {e})"
        ) from None
    if not imgs:
        raise StageError(f"{json_path}: lists no images")
    missing = [im["file_name"] for im in imgs if not (images_dir / im["file_name"]).is_file()]
    if missing:
        raise StageError(
            f"{json_path}: {len(missing)} of {len(imgs)} images are not in {images_dir}, "
            f"e.g. {', '.join(missing[:3])}"
        )
    known = {im["id"] for im in imgs}
    stray = [a.get("id") for a in anns if a.get("image_id") not in known]
    if stray:
        raise StageError(
            f"{json_path}: {len(stray)} annotations name image ids that are not listed, "
            f"e.g. annotation ids {stray[:3]}"
        )
    renumber = {c["id"]: i + 1 for i, c in enumerate(cats)}
    bad = [a.get("id") for a in anns if a.get("category_id") not in renumber]
    if bad:
        raise StageError(
            f"{json_path}: {len(bad)} annotations have an unknown category_id, e.g. ids {bad[:3]}"
        )
    # Ultralytics' converter also wants integer image ids; COCO allows any, so number them too.
    image_ids = {im["id"]: i for i, im in enumerate(imgs, start=1)}
    data = {
        **data,
        "categories": [{**c, "id": renumber[c["id"]]} for c in cats],
        "images": [{**im, "id": image_ids[im["id"]]} for im in imgs],
        "annotations": [
            {**a, "category_id": renumber[a["category_id"]], "image_id": image_ids[a["image_id"]]}
            for a in anns
        ],
    }
    from stages.detect import yolo

    yolo.configure()  # before importing ultralytics: otherwise it writes its settings file under $HOME
    from ultralytics.data.converter import convert_coco

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in").mkdir()
        (Path(tmp) / "in" / "instances.json").write_text(json.dumps(data))
        convert_coco(str(Path(tmp) / "in"), save_dir=str(Path(tmp) / "out"), cls91to80=False)
        converted = Path(tmp) / "out" / "labels" / "instances"
        if converted.is_dir():
            shutil.copytree(converted, out_labels, dirs_exist_ok=True)
    out_labels.mkdir(parents=True, exist_ok=True)
    images = {
        Path(im["file_name"]).with_suffix("").as_posix(): images_dir / im["file_name"]
        for im in imgs
    }
    return images, [c["name"] for c in cats]


def voc_to_yolo(source: Path, out_labels: Path) -> tuple[dict[str, Path], list[str], int]:
    """Pascal VOC (Annotations/*.xml beside JPEGImages/) → YOLO label files. Ultralytics
    has no VOC converter outside its VOC download script, so this one is ours.

    As VOC's own devkit: pixel coordinates are 1-based and inclusive (xmin = 1 is the first
    pixel column, a box covers xmax - xmin + 1 pixels), so the box in continuous 0-based
    coordinates is [xmin - 1, ymin - 1, xmax, ymax]; objects marked `difficult` are left
    out (VOC's evaluation neither requires nor penalises them; Ultralytics' VOC script drops
    them from training). The XML is parsed with defusedxml (entity expansion, external
    entities and DTDs refused): annotations are untrusted input.
    Class names: sorted names found in the XML files (difficult objects' included).
    Returns images, names and the number of difficult objects left out."""
    from xml.etree.ElementTree import ParseError

    import defusedxml.ElementTree as SafeET
    from defusedxml import DefusedXmlException

    ann_dir, img_dir = source / "Annotations", source / "JPEGImages"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise StageError(f"{source}: a VOC dataset needs Annotations/ and JPEGImages/ folders")
    parsed = []
    for xml in sorted(ann_dir.glob("*.xml")):
        try:
            root = SafeET.parse(xml).getroot()
            name = root.findtext("filename") or f"{xml.stem}.jpg"
            w, h = float(root.findtext("size/width")), float(root.findtext("size/height"))
            objects = [
                (
                    o.findtext("name").strip(),
                    (o.findtext("difficult") or "0").strip() == "1",
                    *(float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")),
                )
                for o in root.iter("object")
            ]
        except (ParseError, DefusedXmlException, TypeError, ValueError, AttributeError) as e:
            raise StageError(f"{xml}: malformed VOC annotation ({type(e).__name__}: {e})") from None
        if w <= 0 or h <= 0:
            raise StageError(f"{xml}: image size {w:g}x{h:g} must be positive")
        if not (img_dir / name).is_file():
            raise StageError(f"{xml}: its image {img_dir / name} does not exist")
        parsed.append((xml, img_dir / name, w, h, objects))
    if not parsed:
        raise StageError(f"{ann_dir}: no .xml annotations")
    names = sorted({o[0] for *_, objects in parsed for o in objects})
    out_labels.mkdir(parents=True, exist_ok=True)
    images, difficult = {}, 0
    for xml, img, w, h, objects in parsed:
        images[xml.stem] = img
        lines = []
        for n, hard, x0, y0, x1, y1 in objects:
            difficult += hard
            x0, y0 = (
                max(x0 - 1, 0.0),
                max(y0 - 1, 0.0),
            )  # 1-based → 0-based (xmin = 0 is seen in the wild)
            if not hard:
                lines.append(
                    yolo_line(
                        names.index(n),
                        (x0 + x1) / 2 / w,
                        (y0 + y1) / 2 / h,
                        (x1 - x0) / w,
                        (y1 - y0) / h,
                    )
                )
        (out_labels / f"{xml.stem}.txt").write_text("".join(lines))
    return images, names, difficult


def label_tables(
    images: dict[str, Path], labels: dict[str, list[dict]], names: list[str], orphans: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(images table, boxes table) for validation: a row per image (decodes, size, boxes,
    has a label file) and a row per box line (fields, class, coordinates)."""
    rows = []
    for key, path in images.items():
        info = inspect_image(path)
        rows.append(
            {
                "image": key,
                "file": str(path),
                "width": info["width"],
                "height": info["height"],
                "error": info["error"],
                "sha256": info["sha256"],
                "has_label": key in labels,
                "has_image": True,
                "boxes": len(labels.get(key, [])),
            }
        )
    rows += [
        {
            "image": f"(label) {o}",
            "file": o,
            "width": None,
            "height": None,
            "error": None,
            "sha256": None,
            "has_label": True,
            "has_image": False,
            "boxes": 0,
        }
        for o in orphans
    ]
    image_table = pd.DataFrame(rows).set_index("image")
    boxes = [{"image": key, **row} for key, rows_ in labels.items() for row in rows_]
    box_table = pd.DataFrame(
        boxes, columns=["image", "line", "fields", "cls", "x", "y", "w", "h", "text"]
    )
    box_table.index = [f"{r.image}:{r.line}" for r in box_table.itertuples()]
    box_table["class_name"] = box_table["cls"].map(
        lambda c: (
            names[int(c)] if c == c and 0 <= c < len(names) and float(c).is_integer() else None
        )
    )
    return image_table, box_table
