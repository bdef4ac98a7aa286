"""Benchmark section 1: onnxruntime vs torch on the exported models, per task and batch size."""

from __future__ import annotations

from pathlib import Path

from stages.core import layout
from stages.core.inference import open_session, physical_cores
from tools.bench.repo import (
    model_inputs,
    torch_model,
)
from tools.bench.timing import alternate, median, ratio_row


# ------------------------------------------------------------------ 1. inference
def inference(quick: bool, scratch: Path) -> dict:
    """onnxruntime vs torch eager on the same inputs, batch 1 and 64, same thread count;
    then the session options against each other (threads, spinning)."""
    import torch

    threads = physical_cores()
    torch.set_num_threads(threads)
    rounds = 2 if quick else 15
    rows, notes, details = [], [], {"threads": threads}
    big = 8 if quick else 64
    for task in ("tabular", "image", "detect"):
        xs = model_inputs(task, big)  # the test splits have at least 64 rows / images
        model = torch_model(task)
        sessions = {
            "default": open_session(layout.model_onnx(task)),
            "no spinning": open_session(layout.model_onnx(task), spinning=False),
            "1 thread": open_session(layout.model_onnx(task), threads=1),
        }
        name = sessions["default"].get_inputs()[0].name
        for batch in (1, big):
            x = xs[:batch]
            xt = torch.from_numpy(x)

            def eager(xt=xt):
                with torch.inference_mode():
                    model(xt)

            contenders = {
                f"onnxruntime {k}": (lambda s=s, x=x: s.run(None, {name: x}))
                for k, s in sessions.items()
            }
            times = alternate(
                {**contenders, "torch": eager},
                rounds,
                number=None,
                sample_s=0.01 if quick else 0.05,
                max_s=6,
            )
            rate = {k: batch / median(v) for k, v in times.items()}
            details[f"{task}_b{batch}_items_per_s"] = rate
            target = 1.5 if task != "tabular" and batch == 1 else None
            rows.append(
                ratio_row(
                    f"{task} batch {batch}",
                    ("onnxruntime", rate["onnxruntime default"], "items/s"),
                    ("torch", rate["torch"], "items/s"),
                    target,
                )
            )
            for k in ("no spinning", "1 thread"):
                rows.append(
                    ratio_row(
                        f"  session: {k} vs default ({threads} threads, spinning)",
                        (k, rate[f"onnxruntime {k}"], "items/s"),
                        ("default", rate["onnxruntime default"], "items/s"),
                    )
                )
    notes.append(
        f"torch.set_num_threads({threads}) = onnxruntime intra-op threads = physical cores; "
        "torch eager under torch.inference_mode; detect: Ultralytics DetectionModel, fused"
    )
    return {"rows": rows, "notes": notes, "details": details}
