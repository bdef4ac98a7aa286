"""export: the trained model → ONNX (dynamic batch) + a model card, checked against torch.

    python -m stages.export tabular

Fails when onnxruntime and torch disagree on the test split beyond `export.parity_atol`
or on any predicted class. Outputs: models/<task>/model.onnx, models/<task>/model.json,
and models/<task>/model.ts when `export.torchscript` is on.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.common import StageError, atomic_path, git_revision, log, read_json, run_stage, write_json
from stages.evaluate import load_model, predict, split_images
from stages.image import preprocess
from stages.onnx_session import open_session, run_batches
from stages.tabular import Preprocessor


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Dynamo export with a symbolic batch dimension; everything else stays fixed."""
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), input_names=["input"],
                                    output_names=["output"], dynamo=True, verbose=False)
        program.save(str(tmp))


def check_parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray, atol: float, classify: bool,
                 min_agreement: float = 1.0) -> dict:
    """onnxruntime vs torch on the same inputs: batch 1, batch N, max abs difference and
    (for classifiers) the share of identical top-1 classes."""
    session = open_session(onnx_path)
    expected = predict(model, x)
    got = run_batches(session, x, batch_size=min(len(x), 256))
    single = run_batches(session, x[:1], batch_size=1)
    if got.shape != expected.shape or single.shape != expected[:1].shape:
        raise StageError(f"{onnx_path}: output shape {got.shape} (batch {len(x)}) / {single.shape} (batch 1) "
                         f"differs from torch's {expected.shape}")
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(1) == expected.argmax(1)).mean()) if classify else 1.0
    result = {"max_abs_diff": diff, "class_agreement": agree, "rows": len(x), "atol": atol}
    if diff > atol or agree < min_agreement:
        raise StageError(f"{onnx_path}: onnxruntime disagrees with torch on {len(x)} test inputs "
                         f"(max abs diff {diff:.3g}, limit {atol}; top-1 agreement {agree:.4f}, "
                         f"minimum {min_agreement})")
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_common(task: str, kind: str, onnx_path: Path, input_shape: list, meta: dict, parity: dict,
                export_params: dict) -> dict:
    """The model-card fields every task shares."""
    validation = read_json(f"metrics/{task}/validation.json")
    session = open_session(onnx_path, threads=1)
    return {
        "task": task,
        "kind": kind,
        "git_revision": git_revision(),
        "onnx": {"file": onnx_path.name, "sha256": sha256(onnx_path), "input": session.get_inputs()[0].name,
                 "output": session.get_outputs()[0].name, "input_shape": input_shape},
        "metrics": read_json(f"metrics/{task}/metrics.json"),
        "training": meta["train"],
        "params": {**meta["schema"]["params"], **meta["params"], f"{task}.export": export_params},
        "validation": {"success": validation["success"], "suite_file": validation["suite_file"]},
        "parity": parity,
        "data": {"source": meta["schema"]["source"], "rows": meta["schema"]["rows"]},
    }


def export_tabular(params: dict, out_dir: Path = Path("models/tabular")) -> dict:
    p = params["tabular"]["export"]
    model, meta = load_model(out_dir / "model.pt")
    schema, pre = meta["schema"], Preprocessor.from_dict(meta["preprocessor"])
    x_test = pre.transform(pd.read_parquet("data/prepared/tabular/test.parquet"))
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, torch.from_numpy(x_test[:2]), onnx_path)
    parity = check_parity(model, onnx_path, x_test, p["parity_atol"], schema["task"] == "classification")
    if p["torchscript"]:
        with atomic_path(out_dir / "model.ts") as tmp:
            torch.jit.trace(model, torch.from_numpy(x_test[:2])).save(str(tmp))
    card = {
        **card_common("tabular", schema["task"], onnx_path, ["batch", pre.n_features], meta, parity, p),
        "target": schema["target"],
        "classes": schema["classes"],
        "features": [{**f, **({"categories": pre.categories[f["name"]]} if f["type"] == "categorical" else {})}
                     for f in schema["features"]],
        "preprocessing": pre.to_dict(),
        "preprocessing_notes": "numeric: median-impute, then (x - mean) / std; categorical: one-hot in the "
                               "listed order (missing = all zeros, unseen = error); see stages/tabular.py",
        "target_scaling": meta["target_scaling"],
        "postprocessing": "softmax over output" if schema["task"] == "classification"
                          else "output * target_scaling.std + target_scaling.mean",
    }
    write_json(out_dir / "model.json", card)
    log(f"exported {onnx_path} (parity: max abs diff {parity['max_abs_diff']:.2e} over {parity['rows']} rows)")
    return card


def export_image(params: dict, out_dir: Path = Path("models/image")) -> dict:
    p = params["image"]["export"]
    model, meta = load_model(out_dir / "model.pt")
    schema = meta["schema"]
    paths, _ = split_images(schema)
    x_test = preprocess(paths, schema)
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, torch.from_numpy(x_test[:2]), onnx_path)
    parity = check_parity(model, onnx_path, x_test, p["parity_atol"], True, p["min_top1_agreement"])
    size = schema["image_size"]
    card = {
        **card_common("image", "classification", onnx_path, ["batch", 3, size, size], meta, parity, p),
        "classes": schema["classes"],
        "preprocessing": {"image_size": size, "mean": schema["mean"], "std": schema["std"], "mode": "RGB",
                          "resize": "bilinear to image_size x image_size (aspect ratio not kept)",
                          "scale": "x / 255", "layout": "NCHW float32"},
        "postprocessing": "softmax over output",
    }
    write_json(out_dir / "model.json", card)
    log(f"exported {onnx_path} (parity: max abs diff {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['class_agreement']:.4f} over {parity['rows']} images)")
    return card


def detections_onnx(session, files: list[Path], size: int, conf: float, iou: float) -> list[np.ndarray]:
    """Our torch-free path: letterbox, onnxruntime, decode + NMS (the same code as infer)."""
    from stages.detect import decode, load_for_detection

    out = []
    for f in files:
        x, meta = load_for_detection(f, size)
        out.append(decode(session.run(None, {session.get_inputs()[0].name: x[None]})[0][0], meta, conf, iou))
    return out


def match_share(reference: list[np.ndarray], candidate: list[np.ndarray], min_iou: float) -> float:
    """Share of reference boxes with a same-class candidate box at IoU >= min_iou (one-to-one)."""
    from stages.detect import box_iou

    total = matched = 0
    for ref, cand in zip(reference, candidate):
        total += len(ref)
        used = np.zeros(len(cand), bool)
        ious = box_iou(ref[:, :4], cand[:, :4]) if len(ref) and len(cand) else np.zeros((len(ref), 0))
        for i in np.argsort(-ref[:, 4]):
            ok = (~used) & (cand[:, 5] == ref[i, 5]) & (ious[i] >= min_iou) if len(cand) else np.zeros(0, bool)
            if ok.any():
                used[np.flatnonzero(ok)[np.argmax(ious[i][ok])]] = True
                matched += 1
    return matched / total if total else 1.0


def export_detect(params: dict, out_dir: Path = Path("models/detect")) -> dict:
    """Ultralytics' ONNX exporter (dynamic axes), then the input fixed to imgsz × imgsz with
    a dynamic batch; parity: our numpy pipeline vs Ultralytics' predict on the val images."""
    import shutil
    import tempfile

    import onnx

    from stages import yolo

    p = params["detect"]["export"]
    yolo.configure()
    from ultralytics import YOLO

    model = YOLO(out_dir / "model.pt")
    size = int(model.ckpt["train_args"]["imgsz"])
    onnx_path = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=yolo.CACHE) as tmp:
        shutil.copy2(out_dir / "model.pt", Path(tmp) / "model.pt")
        exported = YOLO(Path(tmp) / "model.pt").export(format="onnx", imgsz=size, dynamic=True, simplify=False,
                                                        device="cpu", verbose=False)
        graph = onnx.load(exported)
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = size  # fixed imgsz; the batch stays symbolic
        with atomic_path(onnx_path) as out:
            onnx.save(graph, str(out))
    files = sorted(f for f in Path("data/prepared/detect/images/val").iterdir() if f.is_file())
    theirs = [np.concatenate([r.boxes.xyxy.numpy(), r.boxes.conf.numpy()[:, None], r.boxes.cls.numpy()[:, None]], 1)
              for r in model.predict([str(f) for f in files], imgsz=size, conf=p["conf"], iou=p["iou"],
                                     device="cpu", verbose=False, stream=True)]
    ours = detections_onnx(open_session(onnx_path), files, size, p["conf"], p["iou"])
    parity = {"images": len(files), "boxes_ultralytics": int(sum(len(t) for t in theirs)),
              "boxes_onnx": int(sum(len(o) for o in ours)),
              "matched_of_ultralytics": match_share(theirs, ours, p["match_iou"]),
              "matched_of_onnx": match_share(ours, theirs, p["match_iou"]), "match_iou": p["match_iou"]}
    if min(parity["matched_of_ultralytics"], parity["matched_of_onnx"]) < p["min_matched"]:
        raise StageError(f"{onnx_path}: onnxruntime + numpy decoding matches Ultralytics on too few boxes: {parity}")
    names = read_json("data/prepared/detect/dataset.json")["names"]
    args = model.ckpt["train_args"]
    meta = {"train": {k: args.get(k) for k in ("model", "epochs", "imgsz", "batch", "lr0", "patience", "seed")},
            "schema": read_json("data/prepared/detect/dataset.json"), "params": {"seed": args.get("seed")}}
    card = {
        **card_common("detect", "detection", onnx_path, ["batch", 3, size, size], meta, parity, p),
        "classes": names,
        "preprocessing": {"imgsz": size, "letterbox": "keep aspect ratio, bilinear (as cv2.INTER_LINEAR), "
                          "centre, pad with 114", "mode": "RGB", "scale": "x / 255", "layout": "NCHW float32"},
        "postprocessing": {"output": "(batch, 4 + classes, anchors): cx, cy, w, h in input pixels, then class scores",
                           "nms": "per class, greedy", "conf": p["conf"], "iou": p["iou"], "max_det": 300},
    }
    write_json(out_dir / "model.json", card)
    log(f"exported {onnx_path} (parity on {len(files)} val images: {parity['matched_of_ultralytics']:.3f} of "
        f"Ultralytics' boxes matched at IoU >= {p['match_iou']})")
    return card


if __name__ == "__main__":
    run_stage({"tabular": export_tabular, "image": export_image, "detect": export_detect})
