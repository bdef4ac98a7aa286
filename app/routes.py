"""The REST routes (health, readiness, metrics, model cards, predict) and the error
handlers: every 4xx is a sentence that names the field and the row, never an echo of the
input (a NaN echoed back would not even be JSON).

(No `from __future__ import annotations`: FastAPI must see the request model built at run time
from the model card as a real type, not a string.)"""

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.limits import error_body
from app.predict import BadInput, Loaded, predict_detect, predict_image, predict_tabular
from app.settings import Settings
from app.v2_tensors import TensorError
from stages.core.card import Card
from stages.core.params import TASKS


@dataclass
class Served:
    """What the routes share: the models, why others are missing, the settings, metrics."""

    models: dict[str, Loaded]
    missing: dict[str, str]
    cfg: Settings
    metrics: object
    tabular_model: type
    app_version: str


def tabular_request(card: Card | None, max_rows: int):
    """The request body for /predict/tabular, generated from the model card's feature schema:
    every feature present (null = missing, imputed), numbers finite, categories from training,
    no other fields."""
    if card is None:
        row = dict[str, float | str | None]
    else:
        fields = {}
        for f in card.features:
            if f.type == "numeric":
                fields[f.name] = (Annotated[float, Field(allow_inf_nan=False)] | None, ...)
            elif f.type in ("text", "datetime"):  # free strings: the preprocessor reads dates
                fields[f.name] = (str | None, ...)
            else:
                fields[f.name] = (Literal[tuple(f.categories)] | None, ...)
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


def install_handlers(app) -> None:
    def answer(request: Request, status: int, message: str, headers=None) -> Response:
        return Response(error_body(request.url.path, message), status, headers, "application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if any(tuple(e["loc"]) == ("path", "name") for e in exc.errors()):  # v2: no such model
            name = request.path_params.get("name")
            return answer(request, 404, f"no model named {name!r}; the models: {', '.join(TASKS)}")
        return answer(request, 422, sentences(exc.errors()))

    @app.exception_handler(StarletteHTTPException)  # FastAPI's, and the body limit's
    async def http_error(request: Request, exc: StarletteHTTPException):
        return answer(request, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return answer(request, exc.status, str(exc))

    @app.exception_handler(TensorError)
    async def bad_tensor(request: Request, exc: TensorError):
        return answer(request, exc.status, str(exc))


def read_upload(file: UploadFile, cfg: Settings) -> bytes:
    data = file.file.read(cfg.max_bytes + 1)
    if len(data) > cfg.max_bytes:
        raise HTTPException(413, f"upload over the {cfg.max_upload_mb:g} MB limit")
    if not data:
        raise HTTPException(422, "the upload is empty")
    return data


def model(s: Served, task: str) -> Loaded:
    if task not in s.models:
        raise HTTPException(503, f"the {task} model is not loaded: {s.missing[task]}")
    return s.models[task]


def info_routes(s: Served) -> APIRouter:
    r = APIRouter()

    @r.get("/health", summary="Liveness")
    def health() -> dict:
        return {"status": "ok"}

    @r.get("/ready", summary="Which models are loaded")
    def ready() -> JSONResponse:
        body = {
            "ready": bool(s.models),
            "loaded": sorted(s.models),
            "missing": s.missing,
            "workers": s.cfg.workers,
        }
        return JSONResponse(body, 200 if s.models else 503)

    @r.get(
        "/metrics",
        summary="Prometheus metrics: requests, errors, latency, input drift and warnings",
    )
    def metrics() -> Response:
        return Response(s.metrics.scrape(), media_type=s.metrics.content_type)

    @r.get("/model/info", summary="The model cards of the loaded models")
    def model_info() -> dict:
        return {"models": {t: m.card.dump() for t, m in s.models.items()}, "missing": s.missing}

    @r.get("/model/info/{task}", summary="One model card")
    def model_info_task(task: Literal[TASKS]) -> dict:
        # A closed set of names: "../x" or any other value is a 422, never a path on disk.
        return model(s, task).card.dump()

    return r


EXPLAIN_TABULAR = (
    "also answer `base_value` and `attributions` ({column: value}) per row: each column's "
    "share of the answer's probability (or prediction), which they sum to (docs/explain.md)"
)

EXPLAIN_IMAGE = (
    "also answer `heatmap_png`: the predicted class's activation map, a base64 grayscale PNG "
    "the size of the image (0 = no evidence, 255 = the most; docs/explain.md)"
)


def predict_routes(s: Served, key_check) -> APIRouter:
    r = APIRouter(dependencies=[Depends(key_check)])
    TabularRequest = s.tabular_model

    @r.post(
        "/predict/tabular",
        summary="Predict rows (JSON) with the tabular model; `warnings` per row name "
        "values outside the validated range (serve.strict: a 422)",
    )
    def tabular(
        body: TabularRequest,  # type: ignore[valid-type]
        explain: Annotated[bool, Query(description=EXPLAIN_TABULAR)] = False,
    ) -> dict:
        m = model(s, "tabular")
        rows = [r if isinstance(r, dict) else r.model_dump() for r in body.rows]
        return {"model_version": m.version, "predictions": predict_tabular(m, rows, explain)}

    @r.post("/predict/image", summary="Classify one image (multipart upload)")
    def image(
        file: Annotated[UploadFile, File(description="an image PIL can read")],
        top_k: Annotated[int, Query(ge=1, le=100)] = s.cfg.top_k,
        explain: Annotated[bool, Query(description=EXPLAIN_IMAGE)] = False,
    ) -> dict:
        m = model(s, "image")
        k = min(top_k, len(m.card.classes))
        return {
            "model_version": m.version,
            **predict_image(m, read_upload(file, s.cfg), k, s.cfg.max_pixels, explain),
        }

    @r.post("/predict/detect", summary="Detect objects in one image (multipart upload)")
    def detect(
        file: Annotated[UploadFile, File(description="an image PIL can read")],
        conf: Annotated[
            float | None, Query(ge=0, le=1, description="default: the model card's")
        ] = None,
        iou: Annotated[
            float | None, Query(ge=0, le=1, description="default: the model card's")
        ] = None,
    ) -> dict:
        m = model(s, "detect")
        found = predict_detect(m, read_upload(file, s.cfg), conf, iou, s.cfg.max_pixels)
        return {"model_version": m.version, **found}

    return r
