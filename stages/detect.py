"""Object detection data and inference, torch-free: reading YOLO, COCO and Pascal VOC
labels into one table, the scene generator for the demo data, and the onnxruntime
pre/post-processing (letterbox, decode, NMS) that `infer`, the app and the export
parity check share.

Boxes are YOLO-style throughout: class id and normalised centre x, y, width, height.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from stages.common import StageError
from stages.image import image_extensions, inspect_image

FORMATS = ("yolo", "coco", "voc")
SHAPES = ["circle", "square", "triangle"]


# ---------------------------------------------------------------- demo data
def shapes_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[tuple]]:
    """One synthetic scene: 1-6 circles, squares and triangles of random size, colour and
    position (overlaps allowed) on a textured background (gradient, stripes, noise)."""
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    bg = (c1 * (1 - t) + c2 * t) * np.ones((size, 1, 1))
    if rng.random() < 0.5:
        bg += 25 * np.sin(np.arange(size) * 2 * np.pi / rng.integers(6, 20))[:, None, None]
    bg += rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes = []
    for _ in range(int(rng.integers(1, 7))):
        cls = int(rng.integers(0, len(SHAPES)))
        s = int(rng.integers(size // 8, size // 3))
        x0, y0 = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if cls == 0:
            draw.ellipse([x0, y0, x0 + s, y0 + s], fill=colour, outline=(0, 0, 0))
        elif cls == 1:
            draw.rectangle([x0, y0, x0 + s, y0 + s], fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=colour, outline=(0, 0, 0))
        boxes.append((cls, (x0 + s / 2) / size, (y0 + s / 2) / size, s / size, s / size))
    return img, boxes


def yolo_line(cls: int, x: float, y: float, w: float, h: float) -> str:
    return f"{cls} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n"


# ---------------------------------------------------------------- reading labels
def _images_under(folder: Path) -> dict[str, Path]:
    """{path relative to folder, without extension: file} for every image file below folder."""
    exts = image_extensions()
    found: dict[str, Path] = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix.lower() in exts and not f.name.startswith("."):
            key = f.relative_to(folder).with_suffix("").as_posix()
            if key in found:  # cat.png and cat.jpg would share one label file
                raise StageError(f"{found[key]} and {f}: two images with one name; rename one")
            found[key] = f
    return found


def parse_yolo_label(path: Path) -> list[dict]:
    """Every non-empty line of a YOLO label file, kept even when malformed (validation names it)."""
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        row = {"line": n, "fields": len(fields), "cls": np.nan, "x": np.nan, "y": np.nan, "w": np.nan, "h": np.nan,
               "text": line.strip()}  # in full: prepare writes the label files from it (a cut line is a wrong box)
        if len(fields) == 5:
            try:
                row.update(zip(("cls", "x", "y", "w", "h"), map(float, fields)))
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
        raise StageError(f"{source}: a YOLO dataset needs images/ and labels/ folders (or a data.yaml)")
    if names is None:
        for candidate in (source / "data.yaml", source / "classes.txt"):
            if candidate.is_file():
                text = candidate.read_text()
                names = (yaml.safe_load(text) or {}).get("names") if candidate.suffix == ".yaml" \
                    else [n.strip() for n in text.splitlines() if n.strip()]
                if isinstance(names, dict):
                    names = [names[k] for k in sorted(names)]
                break
    if not names:
        raise StageError(f"{source}: no class names (add data.yaml with `names:` or classes.txt)")
    images = _images_under(source / "images")
    label_files = {f.relative_to(source / "labels").with_suffix("").as_posix(): f
                   for f in sorted((source / "labels").rglob("*.txt"))}
    labels = {k: parse_yolo_label(f) for k, f in label_files.items() if k in images}
    orphans = [str(f) for k, f in label_files.items() if k not in images]
    return images, labels, [str(n) for n in names], orphans


def coco_to_yolo(json_path: Path, images_dir: Path, out_labels: Path) -> tuple[dict[str, Path], list[str]]:
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
        raise StageError(f"{json_path}: not a COCO detection JSON ({type(e).__name__}: {e})") from None
    if not imgs:
        raise StageError(f"{json_path}: lists no images")
    missing = [im["file_name"] for im in imgs if not (images_dir / im["file_name"]).is_file()]
    if missing:
        raise StageError(f"{json_path}: {len(missing)} of {len(imgs)} images are not in {images_dir}, "
                         f"e.g. {', '.join(missing[:3])}")
    known = {im["id"] for im in imgs}
    stray = [a.get("id") for a in anns if a.get("image_id") not in known]
    if stray:
        raise StageError(f"{json_path}: {len(stray)} annotations name image ids that are not listed, "
                         f"e.g. annotation ids {stray[:3]}")
    renumber = {c["id"]: i + 1 for i, c in enumerate(cats)}
    bad = [a.get("id") for a in anns if a.get("category_id") not in renumber]
    if bad:
        raise StageError(f"{json_path}: {len(bad)} annotations have an unknown category_id, e.g. ids {bad[:3]}")
    # Ultralytics' converter also wants integer image ids; COCO allows any, so number them too.
    image_ids = {im["id"]: i for i, im in enumerate(imgs, start=1)}
    data = {**data, "categories": [{**c, "id": renumber[c["id"]]} for c in cats],
            "images": [{**im, "id": image_ids[im["id"]]} for im in imgs],
            "annotations": [{**a, "category_id": renumber[a["category_id"]], "image_id": image_ids[a["image_id"]]}
                            for a in anns]}
    from stages import yolo

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
    images = {Path(im["file_name"]).with_suffix("").as_posix(): images_dir / im["file_name"] for im in imgs}
    return images, [c["name"] for c in cats]


def voc_to_yolo(source: Path, out_labels: Path) -> tuple[dict[str, Path], list[str]]:
    """Pascal VOC (Annotations/*.xml beside JPEGImages/) → YOLO label files. Ultralytics
    has no VOC converter outside its VOC download script, so this one is ours.
    Class names: sorted names found in the XML files."""
    ann_dir, img_dir = source / "Annotations", source / "JPEGImages"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise StageError(f"{source}: a VOC dataset needs Annotations/ and JPEGImages/ folders")
    parsed = []
    for xml in sorted(ann_dir.glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
            name = root.findtext("filename") or f"{xml.stem}.jpg"
            w, h = float(root.findtext("size/width")), float(root.findtext("size/height"))
            objects = [(o.findtext("name").strip(), *(float(o.findtext(f"bndbox/{k}"))
                        for k in ("xmin", "ymin", "xmax", "ymax"))) for o in root.iter("object")]
        except (ET.ParseError, TypeError, ValueError, AttributeError) as e:
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
    images = {}
    for xml, img, w, h, objects in parsed:
        images[xml.stem] = img
        lines = [yolo_line(names.index(n), (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)
                 for n, x0, y0, x1, y1 in objects]
        (out_labels / f"{xml.stem}.txt").write_text("".join(lines))
    return images, names


def label_tables(images: dict[str, Path], labels: dict[str, list[dict]], names: list[str],
                 orphans: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(images table, boxes table) for validation: a row per image (decodes, size, boxes,
    has a label file) and a row per box line (fields, class, coordinates)."""
    rows = []
    for key, path in images.items():
        info = inspect_image(path)
        rows.append({"image": key, "file": str(path), "width": info["width"], "height": info["height"],
                     "error": info["error"], "sha256": info["sha256"], "has_label": key in labels,
                     "has_image": True, "boxes": len(labels.get(key, []))})
    rows += [{"image": f"(label) {o}", "file": o, "width": None, "height": None, "error": None, "sha256": None,
              "has_label": True, "has_image": False, "boxes": 0} for o in orphans]
    image_table = pd.DataFrame(rows).set_index("image")
    boxes = [{"image": key, **row} for key, rows_ in labels.items() for row in rows_]
    box_table = pd.DataFrame(boxes, columns=["image", "line", "fields", "cls", "x", "y", "w", "h", "text"])
    box_table.index = [f"{r.image}:{r.line}" for r in box_table.itertuples()]
    box_table["class_name"] = box_table["cls"].map(lambda c: names[int(c)] if c == c and 0 <= c < len(names)
                                                   and float(c).is_integer() else None)
    return image_table, box_table


# ---------------------------------------------------------------- inference
def resize_bilinear(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """cv2.INTER_LINEAR in numpy (no antialiasing, half-pixel centres), so the served model
    sees the pixels Ultralytics trained and validated it on without needing OpenCV."""
    H, W = img.shape[:2]
    if (H, W) == (h, w):
        return img
    ys = np.clip((np.arange(h) + 0.5) * H / h - 0.5, 0, H - 1)
    xs = np.clip((np.arange(w) + 0.5) * W / w - 0.5, 0, W - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, H - 1), np.minimum(x0 + 1, W - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    f = img.astype(np.float32)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bottom = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return np.clip(np.round(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Ultralytics' LetterBox(auto=False, center=True): keep the aspect ratio, pad with 114.
    Returns the size × size image, the scale, and the (left, top) padding."""
    h, w = rgb.shape[:2]
    r = min(size / h, size / w)
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)  # as Ultralytics: a very thin image keeps 1 pixel
    dw, dh = (size - nw) / 2, (size - nh) / 2
    out = np.full((size, size, 3), 114, np.uint8)
    top, left = round(dh - 0.1), round(dw - 0.1)
    out[top:top + nh, left:left + nw] = resize_bilinear(rgb, nw, nh)
    return out, r, (left, top)


def load_for_detection(path: str | Path, size: int) -> tuple[np.ndarray, dict]:
    """A file → (3 × size × size float32 in [0, 1], what undoing the letterbox needs)."""
    with Image.open(path) as im:
        # Upright, as OpenCV decodes it for Ultralytics (training, validation, predict): PIL alone
        # ignores the EXIF orientation, and a rotated photo was then served sideways.
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    boxed, r, pad = letterbox(rgb, size)
    return np.ascontiguousarray(boxed.transpose(2, 0, 1), dtype=np.float32) / 255.0, \
        {"scale": r, "pad": pad, "width": rgb.shape[1], "height": rgb.shape[0]}


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression over xyxy boxes; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        overlap = inter / (area[i] + area[order[1:]] - inter + 1e-9)
        order = order[1:][overlap <= iou]
    return np.asarray(keep, dtype=int)


def decode(output: np.ndarray, meta: dict, conf: float, iou: float, max_det: int = 300) -> np.ndarray:
    """One image's raw YOLO output (4 + classes, anchors) → N × 6 [x1, y1, x2, y2, score,
    class] in original pixels. Per-class NMS via Ultralytics' class-offset trick."""
    pred = output.T
    scores_all = pred[:, 4:]
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    mask = score > conf
    xywh, cls, score = pred[mask, :4], cls[mask], score[mask]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    keep = nms(xyxy + cls[:, None] * 7680.0, score, iou)[:max_det]
    xyxy, score, cls = xyxy[keep], score[keep], cls[keep]
    left, top = meta["pad"]
    xyxy = (xyxy - np.array([left, top, left, top])) / meta["scale"]
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, meta["width"])
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, meta["height"])
    return np.concatenate([xyxy, score[:, None], cls[:, None].astype(np.float64)], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between xyxy boxes a (N × 4) and b (M × 4)."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation (5-8 turn the image by 90 degrees)."""
    return im.size[::-1] if im.getexif().get(0x0112) in (5, 6, 7, 8) else im.size


def draw_boxes(path: str | Path, dets: np.ndarray, names: list[str]) -> Image.Image:
    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")  # boxes are in upright pixels (load_for_detection)
    draw = ImageDraw.Draw(img)
    for x1, y1, x2, y2, score, cls in dets:
        draw.rectangle([x1, y1, x2, y2], outline=(255, 0, 0), width=2)
        draw.text((x1 + 2, y1 + 1), f"{names[int(cls)]} {score:.2f}", fill=(255, 255, 0))
    return img
