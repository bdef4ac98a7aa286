"""Open Inference Protocol v2 (KServe / Triton HTTP/REST) beside the REST routes: health,
model metadata and readiness, and inference for the models `tabular`, `image` and
`detect`, plain and versioned (/v2/models/{name}/versions/{version}/...). Inference goes
through the same predict_* as the REST routes: the same validation, warnings, limits and
model lock. docs/serving.md describes each model's tensors."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Literal, NamedTuple

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from app.auth import api_key, caller
from app.errors import BadInput
from app.predict import Loaded, predict_detect, predict_image, predict_tabular
from app.routes import Served, explainable, sentences, served
from app.v2_tensors import (
    Input,
    output,
    parameters_of,
    read_inputs,
    split_body,
    wanted_outputs,
)
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


class Tensor(NamedTuple):
    """One output tensor before encoding."""

    datatype: str
    values: object  # a list, or a numpy array
    shape: list[int]
    parameters: dict = {}


Outputs = dict[str, Tensor]


def trust_tensors(preds: list[dict]) -> Outputs:
    """The trust fields of REST predictions as v2 outputs (none where the card has no trust).
    An unbounded interval end (a calibration split too small for alpha) is ±max float64,
    since JSON has no infinity."""
    if not preds or "ood" not in preds[0]:
        return {}
    n, big = len(preds), float(np.finfo(np.float64).max)
    out = {}
    if "prediction_set" in preds[0]:
        sets = [json.dumps(pred["prediction_set"]) for pred in preds]
        out["prediction_set"] = Tensor("BYTES", sets, [n])
    else:
        bounds = [
            [
                -big if pred["interval"][0] is None else pred["interval"][0],
                big if pred["interval"][1] is None else pred["interval"][1],
            ]
            for pred in preds
        ]
        out["interval"] = Tensor("FP64", bounds, [n, 2])
    out["ood_flagged"] = Tensor("BOOL", [pred["ood"]["flagged"] for pred in preds], [n])
    out["ood_p_value"] = Tensor("FP64", [pred["ood"]["p_value"] for pred in preds], [n])
    return out


def tabular_rows(m: Loaded, inputs: dict[str, Input], request_model) -> list[dict]:
    """Feature tensors → JSON-like rows, checked by the REST route's request model."""
    features = m.card.features
    ignored = set(getattr(m.card, "ignored", None) or [])  # the CSV's other columns: not read
    inputs = {k: v for k, v in inputs.items() if k not in ignored}
    unknown = set(inputs) - {f.name for f in features}
    if unknown:
        raise BadInput(
            f"unknown inputs {sorted(unknown)}; the model takes {', '.join(f.name for f in features)}"
        )
    missing = [f.name for f in features if f.name not in inputs]
    if missing:
        raise BadInput(f"missing inputs: {', '.join(missing)}")
    lengths = {len(t.values) for t in inputs.values()}
    if len(lengths) != 1:
        raise BadInput(f"the inputs differ in length ({sorted(lengths)}): one value per row each")
    columns = {f.name: column(f.name, inputs[f.name]) for f in features}
    rows = [dict(zip(columns, r, strict=True)) for r in zip(*columns.values(), strict=True)]
    try:
        request_model.model_validate({"rows": rows})
    except ValidationError as e:
        raise BadInput(sentences(e.errors())) from None
    return rows


def column(name: str, tensor: Input) -> list:
    """One feature's values as JSON-like values (None: missing)."""
    if tensor.datatype == "BYTES":
        try:  # A BYTES tensor cannot hold null: "" is its missing value, as in a CSV.
            return [v.decode() if v else None for v in tensor.values]
        except UnicodeDecodeError:
            raise BadInput(f"input {name}: a value is not UTF-8 text") from None
    v = np.asarray(tensor.values, dtype=np.float64)
    bad = np.flatnonzero(np.isinf(v))
    if len(bad):
        raise BadInput(f"row {bad[0] + 1}, field {name}: {v[bad[0]]} is not a finite number")
    # A float tensor cannot hold null: NaN is its missing value (imputed, as null is).
    return [None if x != x else x for x in v.tolist()]


EXPLAINED = ("attributions", "base_value")


def asks_why(request: dict) -> bool:
    """Whether the request names an explanation among its outputs (they cost model runs)."""
    asked = request.get("outputs")  # not a list: wanted_outputs answers a 422
    return isinstance(asked, list) and any(
        isinstance(o, dict) and o.get("name") in EXPLAINED for o in asked
    )


def metadata_parameters(card: Card) -> dict:
    """The model metadata's `parameters`: the column order of `attributions` (tabular)."""
    if card.task != "tabular" or not card.explain:
        return {}
    return {"parameters": {"attribution_columns": card.explain["columns"]}}


def attribution_tensors(preds: list[dict]) -> Outputs:
    """attributions [N, columns] (the order of the metadata's parameters
    attribution_columns) and base_value [N], when the request asked for them."""
    if not preds or "attributions" not in preds[0]:
        return {}
    n, m = len(preds), len(preds[0]["attributions"])
    return {
        "attributions": Tensor(
            "FP32", [list(pred["attributions"].values()) for pred in preds], [n, m]
        ),
        "base_value": Tensor("FP64", [pred["base_value"] for pred in preds], [n]),
    }


def tabular_outputs(m: Loaded, rows: list[dict], explain: bool = False) -> Outputs:
    preds = predict_tabular(m, rows, explain)
    n = len(preds)
    warnings = Tensor("BYTES", ["; ".join(pred["warnings"]) for pred in preds], [n])
    if m.card.kind != "classification":
        prediction = Tensor("FP64", [pred["prediction"] for pred in preds], [n])
        return {
            "prediction": prediction,
            "warnings": warnings,
            **trust_tensors(preds),
            **attribution_tensors(preds),
        }
    classes = m.card.classes
    probs = [[pred[f"p_{c}"] for c in classes] for pred in preds]
    return {
        "label": Tensor("BYTES", [pred["prediction"] for pred in preds], [n]),
        "probabilities": Tensor("FP32", probs, [n, len(classes)], {"classes": classes}),
        "warnings": warnings,
        **trust_tensors(preds),
        **attribution_tensors(preds),
    }


def images(inputs: dict[str, Input]) -> list[bytes]:
    """The encoded images of an image or detect request: raw in the binary tail, base64 in
    a JSON tensor."""
    if set(inputs) != {"image"} or inputs["image"].datatype != "BYTES":
        raise BadInput("the model takes one BYTES input named `image`: encoded image bytes")
    tensor = inputs["image"]
    if tensor.binary:
        return list(tensor.values)
    try:
        return [base64.b64decode(v, validate=True) for v in tensor.values]
    except ValueError:
        raise BadInput("input image: in a JSON tensor, the image bytes must be base64") from None


def image_outputs(m: Loaded, data: list[bytes], max_rows: int, max_pixels: int) -> Outputs:
    if not 1 <= len(data) <= max_rows:
        raise BadInput(f"input image: 1 to {max_rows} images")
    classes = m.card.classes
    results = [predict_image(m, b, len(classes), max_pixels) for b in data]
    probs = [
        [{t["class"]: t["probability"] for t in r["top_k"]}[c] for c in classes] for r in results
    ]
    n = len(results)
    return {
        "label": Tensor("BYTES", [r["prediction"] for r in results], [n]),
        "probabilities": Tensor("FP32", probs, [n, len(classes)], {"classes": classes}),
        "warnings": Tensor("BYTES", ["; ".join(r["warnings"]) for r in results], [n]),
        **trust_tensors(results),
    }


def thresholds(parameters: dict) -> tuple[float | None, float | None]:
    """The request's conf and iou parameters (None: the model card's)."""
    out = []
    for key in ("conf", "iou"):
        v = parameters.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1
        ):
            raise BadInput(f"parameter {key}: {v!r} is not a number from 0 to 1")
        out.append(v)
    return out[0], out[1]


def detect_outputs(m: Loaded, data: list[bytes], parameters: dict, max_pixels: int) -> Outputs:
    if len(data) != 1:
        raise BadInput("input image: the detect model takes one image per request (shape [1])")
    conf, iou = thresholds(parameters)
    r = predict_detect(m, data[0], conf, iou, max_pixels)
    found = r["detections"]
    boxes = np.array([d["bbox"] for d in found], dtype=np.float32).reshape(-1, 4)
    return {
        "label": Tensor("BYTES", [d["category"] for d in found], [len(found)]),
        "score": Tensor("FP32", [d["score"] for d in found], [len(found)]),
        "bbox": Tensor("FP32", boxes, [len(found), 4]),
        "warnings": Tensor("BYTES", ["; ".join(r["warnings"])], [1]),
    }


def run_model(
    m: Loaded, task: str, inputs: dict[str, Input], parameters: dict, s: Served, why=False
):
    """The task's outputs for the request's inputs (why: the explanations too)."""
    if task == "tabular":
        rows = tabular_rows(m, inputs, s.tabular_model)
        if why:
            explainable(rows, s.cfg)
        return tabular_outputs(m, rows, why)
    if task == "image":
        return image_outputs(m, images(inputs), s.cfg.max_rows, s.cfg.max_pixels)
    return detect_outputs(m, images(inputs), parameters, s.cfg.max_pixels)


def respond(request: dict, name: str, version: str, results: Outputs) -> Response:
    asked = wanted_outputs(request, list(results))
    outs, tail = [], []
    for out_name, binary in asked.items():
        t = results[out_name]
        tensor, raw = output(out_name, t.datatype, t.values, t.shape, binary, **t.parameters)
        outs.append(tensor)
        tail.append(raw)
    body = {"model_name": name, "model_version": version, "outputs": outs}
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


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
State = Annotated[Served, Depends(served)]


def model(s: State, name: Name, request: Request, version: str | None = None) -> Loaded:
    """The model a /v2/models/{name}[/versions/{version}] path names: a version names the
    served model or the candidate; none, the one that answers this caller (app/canary.py)."""
    if name not in s.models:
        raise BadInput(f"the {name} model is not loaded: {s.missing[name]}", 503)
    c = s.repo.candidate
    if c is not None and c.task == name and version == c.model.version:
        return c.model
    if version is not None and version != s.models[name].version:
        raise BadInput(
            f"model {name} has no version {version}; serving {s.models[name].version}", 404
        )
    if version is not None:
        return s.models[name]
    return s.repo.pick(name, caller(request) or getattr(request.state, "request_id", ""))


Model = Annotated[Loaded, Depends(model)]


@router.get("", summary="Server metadata")
def server(s: State) -> dict:
    return {"name": "model-train", "version": s.app_version, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server live")
def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Server ready: every model loaded")
def ready(s: State) -> JSONResponse:
    ok = bool(s.models) and not s.missing
    return JSONResponse({"ready": ok}, 200 if ok else 503)


def metadata(name: Name, m: Model) -> dict:
    inputs, outputs = tensors(m.card)
    return {
        "name": name,
        "versions": [m.version],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
        **metadata_parameters(m.card),
    }


def model_ready(name: Name, m: Model) -> dict:
    return {"name": name, "ready": True}


async def infer(name: Name, m: Model, s: State, request: Request) -> Response:
    header = request.headers.get("inference-header-content-length")
    req, tail = split_body(await request.body(), header)
    inputs = read_inputs(req, tail)
    request.state.model_version = m.version
    parameters = parameters_of(req, "the request")
    results = await run_in_threadpool(run_model, m, name, inputs, parameters, s, asks_why(req))
    again = lambda c: run_model(c, name, inputs, parameters, s)  # noqa: E731
    s.repo.mirror(name, m, again, labels, results)
    return respond(req, name, m.version, results)


def labels(results: Outputs) -> list:
    """One comparable answer per row: the label (or prediction); detect: the sorted labels."""
    if "score" in results:
        return [sorted(results["label"].values)]
    return list((results.get("label") or results["prediction"]).values)


for _prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
    router.add_api_route(
        _prefix, metadata, methods=["GET"], summary="Model metadata: inputs and outputs"
    )
    router.add_api_route(_prefix + "/ready", model_ready, methods=["GET"], summary="Model ready")
    router.add_api_route(
        _prefix + "/infer",
        infer,
        methods=["POST"],
        dependencies=[Depends(api_key)],
        summary="Inference (JSON tensors or Triton's binary-data extension)",
        openapi_extra=INFER_BODY,
    )
