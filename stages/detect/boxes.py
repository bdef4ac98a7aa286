"""Detection inference, torch-free: the letterbox, decode and NMS that `infer`, the app
and the export parity check share, box IoU, detections as COCO-style records, and drawing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps


def resize_bilinear(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """cv2.INTER_LINEAR in numpy (no antialiasing, half-pixel centres), so the served model
    sees the pixels Ultralytics trained and validated it on without needing OpenCV."""
    H, W = img.shape[:2]
    if (h, w) == (H, W):
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
    nw, nh = (
        max(round(w * r), 1),
        max(round(h * r), 1),
    )  # as Ultralytics: a very thin image keeps 1 pixel
    dw, dh = (size - nw) / 2, (size - nh) / 2
    out = np.full((size, size, 3), 114, np.uint8)
    top, left = round(dh - 0.1), round(dw - 0.1)
    out[top : top + nh, left : left + nw] = resize_bilinear(rgb, nw, nh)
    return out, r, (left, top)


def load_for_detection(path: str | Path, size: int) -> tuple[np.ndarray, dict]:
    """A file → (3 × size × size float32 in [0, 1], what undoing the letterbox needs)."""
    with Image.open(path) as im:
        # Upright, as OpenCV decodes it for Ultralytics (training, validation, predict): PIL alone
        # ignores the EXIF orientation, and a rotated photo was then served sideways.
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    boxed, r, pad = letterbox(rgb, size)
    return np.ascontiguousarray(boxed.transpose(2, 0, 1), dtype=np.float32) / 255.0, {
        "scale": r,
        "pad": pad,
        "width": rgb.shape[1],
        "height": rgb.shape[0],
    }


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


def unletterbox(xyxy: np.ndarray, meta: dict) -> np.ndarray:
    """Boxes in letterboxed input pixels → original pixels, clipped to the image."""
    left, top = meta["pad"]
    xyxy = (xyxy - np.array([left, top, left, top])) / meta["scale"]
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, meta["width"])
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, meta["height"])
    return xyxy


def decode(
    output: np.ndarray, meta: dict, conf: float, iou: float, max_det: int = 300, graph: str = "raw"
) -> np.ndarray:
    """One image's YOLO output → N × 6 [x1, y1, x2, y2, score, class] in original pixels.

    graph "raw": the head as trained (4 + classes, anchors): cx, cy, w, h and class scores;
    per-class NMS here via Ultralytics' class-offset trick. "nms" (NMS inside the graph,
    Ultralytics' export nms=True) and "end2end" (NMS-free heads: YOLO26, YOLOv10): already
    final rows (N, 6) [x1, y1, x2, y2, score, class], padded or top-k, so only the
    confidence filter applies (an NMS graph also applied its own export-time conf)."""
    if graph != "raw":
        dets = output[output[:, 4] > conf][:max_det].astype(np.float64)
        return np.concatenate([unletterbox(dets[:, :4], meta), dets[:, 4:6]], axis=1)
    pred = output.T
    scores_all = pred[:, 4:]
    cls = scores_all.argmax(1)
    score = scores_all[np.arange(len(cls)), cls]
    mask = score > conf
    xywh, cls, score = pred[mask, :4], cls[mask], score[mask]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    keep = nms(xyxy + cls[:, None] * 7680.0, score, iou)[:max_det]
    xyxy, score, cls = xyxy[keep], score[keep], cls[keep]
    return np.concatenate(
        [unletterbox(xyxy, meta), score[:, None], cls[:, None].astype(np.float64)], axis=1
    )


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
        img = ImageOps.exif_transpose(im).convert(
            "RGB"
        )  # boxes are in upright pixels (load_for_detection)
    draw = ImageDraw.Draw(img)
    for x1, y1, x2, y2, score, cls in dets:
        draw.rectangle([x1, y1, x2, y2], outline=(255, 0, 0), width=2)
        draw.text((x1 + 2, y1 + 1), f"{names[int(cls)]} {score:.2f}", fill=(255, 255, 0))
    return img


def to_records(dets: np.ndarray, names: list[str]) -> list[dict]:
    """N × 6 detections → COCO-style records: category, bbox [x, y, width, height] in
    pixels, score (what `infer` writes and the REST API answers)."""
    return [
        {
            "category_id": int(c),
            "category": names[int(c)],
            "bbox": [
                round(float(x1), 2),
                round(float(y1), 2),
                round(float(x2 - x1), 2),
                round(float(y2 - y1), 2),
            ],
            "score": round(float(s), 5),
        }
        for x1, y1, x2, y2, s, c in dets
    ]
