"""The REST routes (health, readiness, metrics, model cards, predict) and the error
handlers: every 4xx is a sentence that names the field and the row, never an echo of the
input (a NaN echoed back would not even be JSON).

(No `from __future__ import annotations`: FastAPI must see the request model built at run time
from the model card as a real type, not a string.)"""

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException

from app.auth import api_key, caller
from app.errors import BadInput, error_body
from app.predict import Loaded, predict_detect, predict_image, predict_tabular
from app.repository import Repository
from app.settings import Settings
from stages.core.card import Card
from stages.core.params import TASKS


@dataclass
class Served:
    """What the routes share (app.state.served): the models, why others are missing, the
    settings, metrics, the tabular request model (from the served card's features)."""

    repo: Repository
    cfg: Settings
    metrics: object
    tabular_model: type
    app_version: str

    @property
    def models(self) -> dict[str, Loaded]:
        return self.repo.models

    @property
    def missing(self) -> dict[str, str]:
        return self.repo.missing


def tabular_request(card: Card | None, max_rows: int):
    """The request body for /predict/tabular, generated from the model card's feature schema:
    every feature present (null = missing, imputed), numbers finite; a text, date or category
    column takes a JSON number too (as the CSV reader would have read it); a value the model has
    not seen is answered with a warning (Preprocessor.screen); the CSV's other columns that the
    card lists as `ignored` (ids, constants, the target) are allowed and ignored; no others."""
    if card is None:
        row = dict[str, float | str | None]
    else:
        number = Annotated[float, Field(allow_inf_nan=False)]
        fields = {name: (Any, None) for name in getattr(card, "ignored", None) or []}
        for f in card.features:
            if f.type == "numeric" and getattr(f, "words", None) != "missing":
                fields[f.name] = (number | None, ...)
            else:  # free strings: the preprocessor reads dates, screen() the unseen values
                fields[f.name] = (str | number | None, ...)
        row = create_model("TabularRow", __config__=ConfigDict(extra="forbid"), **fields)
    return create_model(
        "TabularRequest",
        __config__=ConfigDict(extra="forbid"),
        rows=(Annotated[list[row], Field(min_length=1, max_length=max_rows)], ...),
    )


def where(loc: tuple) -> str:
    """("body", "rows", 2, "island") → "row 3, field island"."""
    loc = [x for x in loc if x != "body"]
    if len(loc) >= 2 and loc[0] == "rows" and isinstance(loc[1], int):
        rest = [str(x) for x in loc[2:] if not str(x).startswith(("float", "literal", "none"))]
        return f"row {loc[1] + 1}" + (f", field {rest[0]}" if rest else "")
    return "field " + ".".join(str(x) for x in loc) if loc else "the body"


def sentences(errors: list[dict], limit: int = 10) -> str:
    """Pydantic's errors as one line; a field that fails as a number and as null says why once."""
    seen, out = set(), []
    for e in errors:
        place = where(tuple(e["loc"]))
        if place in seen:
            continue
        seen.add(place)
        msg = e["msg"]
        if e["type"] == "finite_number":
            msg = "NaN and Infinity are not numbers here; send null for a missing value"
        out.append(f"{place}: {msg}")
    more = f" (and {len(out) - limit} more)" if len(out) > limit else ""
    return "; ".join(out[:limit]) + more


def served(request: Request) -> Served:
    """A dependency: what the app serves."""
    return request.app.state.served


State = Annotated[Served, Depends(served)]


def install_handlers(app) -> None:
    def answer(request: Request, status: int, message: str, headers=None) -> Response:
        return Response(error_body(request.url.path, message), status, headers, "application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if any(tuple(e["loc"]) == ("path", "name") for e in exc.errors()):  # v2: no such model
            name = request.path_params.get("name")
            return answer(request, 404, f"no model named {name!r}; the models: {', '.join(TASKS)}")
        return answer(request, 422, sentences(exc.errors()))

    @app.exception_handler(HTTPException)  # BadInput, FastAPI's own, and the body limit's
    async def http_error(request: Request, exc: HTTPException):
        return answer(request, exc.status_code, str(exc.detail), exc.headers)


def read_upload(file: UploadFile, cfg: Settings) -> bytes:
    data = file.file.read(cfg.max_bytes + 1)
    if len(data) > cfg.max_bytes:
        raise BadInput(f"upload over the {cfg.max_upload_mb:g} MB limit", 413)
    if not data:
        raise BadInput("the upload is empty")
    return data


def model(s: Served, task: str, request: Request) -> Loaded:
    """The model that answers the request: the task's served model, or the canary for its
    share of callers (noted in request.state for the access log and metrics)."""
    if task not in s.models:
        raise BadInput(f"the {task} model is not loaded: {s.missing[task]}", 503)
    m = s.repo.pick(task, caller(request) or getattr(request.state, "request_id", ""))
    request.state.model_version = m.version
    return m


async def tabular_rows(request: Request, request_model) -> list[dict]:
    """The body's rows, checked by the request model built from the served card (so it is
    read here rather than declared: the route is written before any card is read)."""
    try:
        body = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"the body is not JSON ({e})") from None
    try:
        parsed = request_model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        ) from None
    return [r if isinstance(r, dict) else r.model_dump() for r in parsed.rows]


def explainable(rows: list, cfg: Settings) -> None:
    """Explanations for at most serve.explain_max_rows rows: each explained row costs up to
    2^M x the background in model rows (docs/explain.md), so 10,000 of them would hold a
    worker for minutes."""
    if len(rows) > cfg.explain_max_rows:
        raise BadInput(
            f"explain: at most {cfg.explain_max_rows} rows per request (serve.explain_max_rows), "
            f"this one has {len(rows)}; send fewer rows or leave explain off"
        )


def tabular_openapi(app, request_model) -> None:
    """Put the request model's spec into /openapi.json as /predict/tabular's body."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = base()
        body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(body.pop("$defs", {}), TabularRequest=body)
        ref = {"$ref": "#/components/schemas/TabularRequest"}
        spec["paths"]["/predict/tabular"]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}},
        }
        return spec

    app.openapi = openapi


info = APIRouter()


@info.get("/health", summary="Liveness")
def health() -> dict:
    return {"status": "ok"}


@info.get("/ready", summary="Which models are loaded")
def ready(s: State) -> JSONResponse:
    body = {
        "ready": bool(s.models),
        "loaded": sorted(s.models),
        "missing": s.missing,
        "workers": s.cfg.workers,
    }
    return JSONResponse(body, 200 if s.models else 503)


@info.get(
    "/metrics", summary="Prometheus metrics: requests, errors, latency, input drift and warnings"
)
def metrics(s: State) -> Response:
    return Response(s.metrics.scrape(), media_type=s.metrics.content_type)


@info.get("/model/info", summary="The model cards of the loaded models")
def model_info(s: State) -> dict:
    return {"models": {t: m.card.dump() for t, m in s.models.items()}, "missing": s.missing}


@info.get("/model/info/{task}", summary="One model card")
def model_info_task(task: Literal[TASKS], s: State, request: Request) -> dict:
    # A closed set of names: "../x" or any other value is a 422, never a path on disk.
    return model(s, task, request).card.dump()


predict = APIRouter(dependencies=[Depends(api_key)])
Upload = Annotated[UploadFile, File(description="an image PIL can read")]
Threshold = Annotated[float | None, Query(ge=0, le=1, description="default: the model card's")]


EXPLAIN_TABULAR = (
    "also answer `base_value` and `attributions` ({column: value}) per row: each column's "
    "share of the answer's probability (or prediction), which they sum to (docs/explain.md)"
)
EXPLAIN_IMAGE = (
    "also answer `heatmap_png`: the predicted class's activation map, a base64 grayscale PNG "
    "the size of the image (0 = no evidence, 255 = the most; docs/explain.md)"
)


@predict.post(
    "/predict/tabular",
    summary="Predict rows (JSON) with the tabular model; `warnings` per row name "
    "values outside the validated range (serve.strict: a 422)",
)
async def tabular(
    s: State, request: Request, explain: Annotated[bool, Query(description=EXPLAIN_TABULAR)] = False
) -> dict:
    rows = await tabular_rows(request, s.tabular_model)
    if explain:
        explainable(rows, s.cfg)
    m = model(s, "tabular", request)
    preds = await run_in_threadpool(predict_tabular, m, rows, explain)
    s.repo.mirror("tabular", m, lambda c: predict_tabular(c, rows), row_labels, preds)
    return {"model_version": m.version, "predictions": preds}


def row_labels(preds: list[dict]) -> list:
    return [pred["prediction"] for pred in preds]


def image_labels(answer: dict) -> list:
    return [answer.get("prediction", sorted(d["category"] for d in answer.get("detections", [])))]


@predict.post("/predict/image", summary="Classify one image (multipart upload)")
def image(
    s: State,
    request: Request,
    file: Upload,
    top_k: Annotated[
        int | None, Query(ge=1, le=100, description="default: image.infer.top_k")
    ] = None,
    explain: Annotated[bool, Query(description=EXPLAIN_IMAGE)] = False,
) -> dict:
    m = model(s, "image", request)
    k = min(top_k or s.cfg.top_k, len(m.card.classes))
    data = read_upload(file, s.cfg)
    found = predict_image(m, data, k, s.cfg.max_pixels, explain)
    s.repo.mirror(
        "image", m, lambda c: predict_image(c, data, k, s.cfg.max_pixels), image_labels, found
    )
    return {"model_version": m.version, **found}


@predict.post("/predict/detect", summary="Detect objects in one image (multipart upload)")
def detect(
    s: State, request: Request, file: Upload, conf: Threshold = None, iou: Threshold = None
) -> dict:
    m = model(s, "detect", request)
    data = read_upload(file, s.cfg)
    found = predict_detect(m, data, conf, iou, s.cfg.max_pixels)
    again = lambda c: predict_detect(c, data, conf, iou, s.cfg.max_pixels)  # noqa: E731
    s.repo.mirror("detect", m, again, image_labels, found)
    return {"model_version": m.version, **found}
