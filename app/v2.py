"""Open Inference Protocol v2 (KServe / Triton HTTP/REST) beside the REST routes: health,
model metadata and readiness, and inference for the models `tabular`, `image` and
`detect`, plain and versioned (/v2/models/{name}/versions/{version}/...). Inference goes
through the same predict_* as the REST routes: the same validation, warnings, limits and
model lock. docs/serving.md describes each model's tensors."""

from __future__ import annotations

import base64
import json
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from app.predict import BadInput, Loaded, predict_detect, predict_image, predict_tabular
from app.routes import sentences
from app.v2_tensors import TensorError, output, read_inputs, split_body, wanted_outputs
from stages.core.card import Card
from stages.core.params import TASKS

Name = Literal[TASKS]
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {"inputs": {"type": "array", "items": {"type": "object"}}},
                }
            }
        },
    }
}


def tensors(card: Card) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) metadata of a model: name, datatype, shape (-1: any size)."""
    if card.task == "tabular":
        inputs = [
            {
                "name": f.name,
                "datatype": "FP64" if f.type == "numeric" else "BYTES",
                "shape": [-1],
            }
            for f in card.features
        ]
    else:
        inputs = [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [-1] if card.task == "image" else [1],
            }
        ]
    if card.task == "detect":
        outputs = [("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("bbox", "FP32", [-1, 4])]
    elif card.kind == "classification":
        outputs = [("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, len(card.classes)])]
    else:
        outputs = [("prediction", "FP64", [-1])]
    outputs.append(("warnings", "BYTES", [-1]))
    if card.trust is not None:  # the REST routes' prediction_set / interval and ood, as tensors
        outputs += [
            ("prediction_set", "BYTES", [-1])  # each element: the set as a JSON list
            if card.kind == "classification"
            else ("interval", "FP64", [-1, 2]),
            ("ood_flagged", "BOOL", [-1]),
            ("ood_p_value", "FP64", [-1]),
        ]
    if card.task == "tabular" and card.explain:  # computed only when asked for
        m = len(card.explain["columns"])
        outputs += [("attributions", "FP32", [-1, m]), ("base_value", "FP64", [-1])]
    return inputs, [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs]


def trust_tensors(preds: list[dict]) -> dict:
    """The trust fields of REST predictions as v2 outputs (none where the card has no trust).
    An unbounded interval end (a calibration split too small for alpha) is ±max float64,
    since JSON has no infinity."""
    if not preds or "ood" not in preds[0]:
        return {}
    n, big = len(preds), float(np.finfo(np.float64).max)
    out = {}
    if "prediction_set" in preds[0]:
        sets = [json.dumps(p["prediction_set"]) for p in preds]
        out["prediction_set"] = ("BYTES", sets, [n], {})
    else:
        bounds = [
            [
                -big if p["interval"][0] is None else p["interval"][0],
                big if p["interval"][1] is None else p["interval"][1],
            ]
            for p in preds
        ]
        out["interval"] = ("FP64", bounds, [n, 2], {})
    out["ood_flagged"] = ("BOOL", [p["ood"]["flagged"] for p in preds], [n], {})
    out["ood_p_value"] = ("FP64", [p["ood"]["p_value"] for p in preds], [n], {})
    return out


EXPLAINED = ("attributions", "base_value")


def metadata_parameters(card: dict) -> dict:
    """The model metadata's `parameters`: the column order of `attributions` (tabular)."""
    if card.task != "tabular" or not card.explain:
        return {}
    return {"parameters": {"attribution_columns": card.explain["columns"]}}


def attribution_tensors(preds: list[dict]) -> dict:
    """attributions [N, columns] (the order of the metadata's parameters
    attribution_columns) and base_value [N], when the request asked for them."""
    if not preds or "attributions" not in preds[0]:
        return {}
    n, m = len(preds), len(preds[0]["attributions"])
    return {
        "attributions": ("FP32", [list(p["attributions"].values()) for p in preds], [n, m], {}),
        "base_value": ("FP64", [p["base_value"] for p in preds], [n], {}),
    }


def tabular_rows(m: Loaded, inputs: dict, request_model, max_rows: int) -> list[dict]:
    """Feature tensors → JSON-like rows, checked by the REST route's request model."""
    features = m.card.features
    unknown = set(inputs) - {f.name for f in features}
    if unknown:
        raise TensorError(
            f"unknown inputs {sorted(unknown)}; the model takes {', '.join(f.name for f in features)}"
        )
    missing = [f.name for f in features if f.name not in inputs]
    if missing:
        raise TensorError(f"missing inputs: {', '.join(missing)}")
    lengths = {len(v) for _, v in inputs.values()}
    if len(lengths) != 1:
        raise TensorError(
            f"the inputs differ in length ({sorted(lengths)}): one value per row each"
        )
    columns = {}
    for f in features:
        dtype, values = inputs[f.name]
        if dtype == "BYTES":
            try:  # A BYTES tensor cannot hold null: "" is its missing value, as in a CSV.
                columns[f.name] = [v.decode() if v else None for v in values]
            except UnicodeDecodeError:
                raise TensorError(f"input {f.name}: a value is not UTF-8 text") from None
        else:
            v = np.asarray(values, dtype=np.float64)
            bad = np.flatnonzero(np.isinf(v))
            if len(bad):
                raise TensorError(
                    f"row {bad[0] + 1}, field {f.name}: {v[bad[0]]} is not a finite number"
                )
            # A float tensor cannot hold null: NaN is its missing value (imputed, as null is).
            columns[f.name] = [None if x != x else x for x in v.tolist()]
    rows = [dict(zip(columns, r, strict=True)) for r in zip(*columns.values(), strict=True)]
    try:
        request_model.model_validate({"rows": rows})
    except ValidationError as e:
        raise TensorError(sentences(e.errors())) from None
    return rows


def run_model(m: Loaded, task: str, inputs: dict, request: dict, ctx) -> dict:
    """{output name: (datatype, values, shape, parameters)}."""
    params = request.get("parameters") or {}
    if task == "tabular":
        explain = any(
            isinstance(o, dict) and o.get("name") in EXPLAINED for o in request.get("outputs") or []
        )
        rows = tabular_rows(m, inputs, ctx.tabular_model, ctx.cfg.max_rows)
        preds = predict_tabular(m, rows, explain)
        warnings = ["; ".join(p["warnings"]) for p in preds]
        n = len(preds)
        if m.card.kind != "classification":
            return {
                "prediction": ("FP64", [p["prediction"] for p in preds], [n], {}),
                "warnings": ("BYTES", warnings, [n], {}),
                **trust_tensors(preds),
                **attribution_tensors(preds),
            }
        classes = m.card.classes
        probs = [[p[f"p_{c}"] for c in classes] for p in preds]
        return {
            "label": ("BYTES", [p["prediction"] for p in preds], [n], {}),
            "probabilities": ("FP32", probs, [n, len(classes)], {"classes": classes}),
            "warnings": ("BYTES", warnings, [n], {}),
            **trust_tensors(preds),
            **attribution_tensors(preds),
        }
    if set(inputs) != {"image"} or inputs["image"][0] != "BYTES":
        raise TensorError("the model takes one BYTES input named `image`: encoded image bytes")
    images = inputs["image"][1]
    if not request.get("_binary_image"):
        try:
            images = [base64.b64decode(v, validate=True) for v in images]
        except ValueError:
            raise TensorError(
                "input image: in a JSON tensor, the image bytes must be base64"
            ) from None
    if task == "image":
        if not 1 <= len(images) <= ctx.cfg.max_rows:
            raise TensorError(f"input image: 1 to {ctx.cfg.max_rows} images")
        classes = m.card.classes
        results = [predict_image(m, b, len(classes), ctx.cfg.max_pixels) for b in images]
        probs = [
            [{t["class"]: t["probability"] for t in r["top_k"]}[c] for c in classes]
            for r in results
        ]
        n = len(results)
        return {
            "label": ("BYTES", [r["prediction"] for r in results], [n], {}),
            "probabilities": ("FP32", probs, [n, len(classes)], {"classes": classes}),
            "warnings": ("BYTES", ["; ".join(r["warnings"]) for r in results], [n], {}),
            **trust_tensors(results),
        }
    if len(images) != 1:
        raise TensorError("input image: the detect model takes one image per request (shape [1])")
    conf, iou = params.get("conf"), params.get("iou")
    for key, v in (("conf", conf), ("iou", iou)):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1
        ):
            raise TensorError(f"parameter {key}: {v!r} is not a number from 0 to 1")
    r = predict_detect(m, images[0], conf, iou, ctx.cfg.max_pixels)
    found = r["detections"]
    return {
        "label": ("BYTES", [d["category"] for d in found], [len(found)], {}),
        "score": ("FP32", [d["score"] for d in found], [len(found)], {}),
        "bbox": (
            "FP32",
            np.array([d["bbox"] for d in found], dtype=np.float32).reshape(-1, 4),
            [len(found), 4],
            {},
        ),
        "warnings": ("BYTES", ["; ".join(r["warnings"])], [1], {}),
    }


def respond(request: dict, name: str, m: Loaded, results: dict) -> Response:
    asked = wanted_outputs(request, list(results))
    outs, tail = [], []
    for out_name, binary in asked.items():
        dtype, values, shape, extra = results[out_name]
        tensor, raw = output(out_name, dtype, values, shape, binary, **extra)
        outs.append(tensor)
        tail.append(raw)
    body = {"model_name": name, "model_version": m.version, "outputs": outs}
    if isinstance(request.get("id"), str):
        body["id"] = request["id"]
    head = json.dumps(body).encode()
    if not any(tail):
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(tail),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def router(ctx, key_check) -> APIRouter:
    """ctx: models, missing, cfg, tabular_model (the REST request model), app_version."""
    r = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

    def model(name: str, version: str | None = None) -> Loaded:
        if name not in ctx.models:
            raise TensorError(f"the {name} model is not loaded: {ctx.missing[name]}", 503)
        m = ctx.models[name]
        if version is not None and version != m.version:
            raise TensorError(f"model {name} has no version {version}; serving {m.version}", 404)
        return m

    @r.get("", summary="Server metadata")
    def server() -> dict:
        return {
            "name": "model-train",
            "version": ctx.app_version,
            "extensions": ["binary_tensor_data"],
        }

    @r.get("/health/live", summary="Server live")
    def live() -> dict:
        return {"live": True}

    @r.get("/health/ready", summary="Server ready: every model loaded")
    def ready() -> JSONResponse:
        ok = bool(ctx.models) and not ctx.missing
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    def metadata(name: Name, version: str | None = None) -> dict:
        m = model(name, version)
        inputs, outputs = tensors(m.card)
        return {
            "name": name,
            "versions": [m.version],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": outputs,
            **metadata_parameters(m.card),
        }

    def model_ready(name: Name, version: str | None = None) -> dict:
        model(name, version)
        return {"name": name, "ready": True}

    async def infer(name: Name, request: Request, version: str | None = None) -> Response:
        m = model(name, version)
        body = await request.body()
        header = request.headers.get("inference-header-content-length")
        req, tail = split_body(body, header)
        inputs = read_inputs(req, tail)
        req["_binary_image"] = bool(header) and any(
            (t.get("parameters") or {}).get("binary_data_size") is not None
            for t in req["inputs"]
            if isinstance(t, dict)
        )
        try:
            results = await run_in_threadpool(run_model, m, name, inputs, req, ctx)
        except BadInput as e:
            raise TensorError(str(e), e.status) from None
        return respond(req, name, m, results)

    auth = [Depends(key_check)]
    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        r.add_api_route(
            prefix, metadata, methods=["GET"], summary="Model metadata: inputs and outputs"
        )
        r.add_api_route(prefix + "/ready", model_ready, methods=["GET"], summary="Model ready")
        r.add_api_route(
            prefix + "/infer",
            infer,
            methods=["POST"],
            dependencies=auth,
            summary="Inference (JSON tensors or Triton's binary-data extension)",
            openapi_extra=INFER_BODY,
        )
    return r
