"""The model server: a REST API and the Gradio app on one port, torch-free.

(No `from __future__ import annotations` here: FastAPI must see the request model
built at run time from the model card as a real type, not a string.)

    make serve          # = python -m app.server → http://127.0.0.1:7860 (UI), /docs (API)

Host, port, workers and limits come from params.yaml `serve:`; APP_HOST, APP_PORT and
APP_WORKERS override them. uvicorn builds the app in each worker process from the import
string `app.server:create_app` (factory mode); with more than one worker the Prometheus
metrics go through multiprocess mode (PROMETHEUS_MULTIPROC_DIR), so /metrics sums the
counters of all workers. A missing model does not stop the server: /ready and its tab say
what is missing.
"""

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field, create_model

from app.predict import (
    BadInput,
    Loaded,
    load_models,
    predict_detect,
    predict_image,
    predict_tabular,
)
from stages.core.params import TASKS, load_params

log = logging.getLogger("app.access")


def serve_config(params_path: str | Path = "params.yaml") -> dict:
    cfg = dict(load_params(params_path)["serve"])
    cfg["host"] = os.environ.get("APP_HOST", cfg["host"])
    cfg["port"] = int(os.environ.get("APP_PORT", cfg["port"]))
    cfg["workers"] = int(os.environ.get("APP_WORKERS", cfg.get("workers", 1)))
    return cfg


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tabular_request(card: dict | None, max_rows: int):
    """The request body for /predict/tabular, generated from the model card's feature schema:
    every feature present (null = missing, imputed), numbers finite, categories from training,
    no other fields."""
    if card is None:
        row = dict[str, float | str | None]
    else:
        fields = {}
        for f in card["features"]:
            if f["type"] == "numeric":
                fields[f["name"]] = (Annotated[float, Field(allow_inf_nan=False)] | None, ...)
            elif f["type"] in ("text", "datetime"):  # free strings: the preprocessor checks dates
                fields[f["name"]] = (str | None, ...)
            else:
                fields[f["name"]] = (Literal[tuple(f["categories"])] | None, ...)
        row = create_model("TabularRow", __config__=ConfigDict(extra="forbid"), **fields)
    return create_model(
        "TabularRequest",
        __config__=ConfigDict(extra="forbid"),
        rows=(Annotated[list[row], Field(min_length=1, max_length=max_rows)], ...),
    )


def create_app(
    models_dir: str | Path = "models", params_path: str | Path = "params.yaml", ui: bool = True
) -> FastAPI:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        ProcessCollector,
        generate_latest,
    )

    cfg = serve_config(params_path)
    # APP_MODELS_DIR: a registered version fetched by `make serve` (tools/registry.py fetch).
    models, missing = load_models(os.environ.get("APP_MODELS_DIR", models_dir), cfg)
    max_bytes = int(cfg["max_upload_mb"] * 1024 * 1024)
    registry = CollectorRegistry()  # per app, so tests can build several
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several workers: each writes its own files
        from prometheus_client import multiprocess

        scrape = CollectorRegistry()
        multiprocess.MultiProcessCollector(scrape)
    else:
        scrape = registry
        ProcessCollector(
            registry=registry
        )  # resident memory, CPU seconds, open files (one process only)
    memory = Gauge(
        "worker_resident_memory_bytes",
        "resident memory of the worker processes (summed)",
        registry=registry,
        multiprocess_mode="livesum",
    )
    drift = Gauge(
        "input_drift_psi",
        "PSI of served inputs over the last serve.drift_window values against the "
        "training data (model card reference); > 0.25 is a shift",
        ["task", "feature"],
        registry=registry,
        multiprocess_mode="livemax",
    )
    warned = Counter(
        "input_warnings",
        "served rows with values outside the validated range or unseen",
        ["task"],
        registry=registry,
    )
    requests = Counter("requests", "HTTP requests", ["task", "status"], registry=registry)
    errors = Counter(
        "request_errors", "HTTP requests answered 4xx or 5xx", ["task"], registry=registry
    )
    latency = Histogram(
        "request_latency_seconds",
        "request latency",
        ["task"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )
    app = FastAPI(
        title="model-train",
        version="0.1.0",
        description="Predictions from the exported ONNX models (tabular, image, detect).",
    )
    app.state.models, app.state.missing, app.state.config = models, missing, cfg
    last_refresh = [0.0]

    def refresh() -> None:
        """Push this worker's drift, warning count and memory into the metrics."""
        last_refresh[0] = time.monotonic()
        memory.set(resident_bytes())
        for task, m in models.items():
            for feature, value in m.monitor.drift().items():
                drift.labels(task, feature).set(value)
            new, m.monitor.warned_reported = (
                m.monitor.warned - m.monitor.warned_reported,
                m.monitor.warned,
            )
            if new:
                warned.labels(task).inc(new)

    if cfg["cors_origins"]:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=cfg["cors_origins"], allow_methods=["GET", "POST"]
        )

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        parts = request.url.path.strip("/").split("/")
        task = parts[1] if parts[0] == "predict" and len(parts) > 1 else "-"
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_bytes:
            response = JSONResponse(
                {"detail": f"request body over the {cfg['max_upload_mb']} MB limit"}, 413
            )
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # noqa: BLE001 - logged with the request, answered as JSON
                response = JSONResponse({"detail": f"internal error: {type(e).__name__}"}, 500)
                log.error(
                    json.dumps({"event": "error", "path": request.url.path, "error": repr(e)})
                )
        elapsed = time.perf_counter() - start
        if task != "-":
            requests.labels(task, str(response.status_code)).inc()
            latency.labels(task).observe(elapsed)
            if response.status_code >= 400:
                errors.labels(task).inc()
            if time.monotonic() - last_refresh[0] > 1:  # at most once a second per worker
                refresh()
        log.info(
            json.dumps(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "status": response.status_code,
                    "ms": round(elapsed * 1000, 2),
                    "task": task,
                    "bytes": size or None,
                }
            )
        )
        return response

    def model(task: str) -> Loaded:
        if task not in models:
            raise HTTPException(503, f"the {task} model is not loaded: {missing[task]}")
        return models[task]

    def read_upload(file: UploadFile) -> bytes:
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload over the {cfg['max_upload_mb']} MB limit")
        if not data:
            raise HTTPException(422, "the upload is empty")
        return data

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return JSONResponse({"detail": str(exc)}, exc.status)

    @app.get("/health", summary="Liveness")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="Which models are loaded")
    def ready() -> JSONResponse:
        body = {
            "ready": bool(models),
            "loaded": sorted(models),
            "missing": missing,
            "workers": cfg["workers"],
        }
        return JSONResponse(body, 200 if models else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics: requests, errors, latency, input drift and warnings",
    )
    def metrics() -> Response:
        refresh()
        return Response(generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model/info", summary="The model cards of the loaded models")
    def model_info() -> dict:
        return {"models": {t: m.card for t, m in models.items()}, "missing": missing}

    @app.get("/model/info/{task}", summary="One model card")
    def model_info_task(task: Literal[TASKS]) -> dict:
        # A closed set of names: "../x" or any other value is a 422, never a path on disk.
        return model(task).card

    TabularRequest = tabular_request(
        models["tabular"].card if "tabular" in models else None, cfg["max_rows"]
    )

    @app.post(
        "/predict/tabular",
        summary="Predict rows (JSON) with the tabular model; `warnings` per row name "
        "values outside the validated range (serve.strict: a 422)",
    )
    def tabular(body: TabularRequest) -> dict:  # type: ignore[valid-type]
        m = model("tabular")
        return {
            "predictions": predict_tabular(
                m, [r if isinstance(r, dict) else r.model_dump() for r in body.rows]
            )
        }

    @app.post("/predict/image", summary="Classify one image (multipart upload)")
    def image(
        file: Annotated[UploadFile, File(description="an image PIL can read")],
        top_k: Annotated[int, Query(ge=1, le=100)] = cfg["top_k"],
    ) -> dict:
        m = model("image")
        return predict_image(
            m, read_upload(file), min(top_k, len(m.card["classes"])), cfg["max_pixels"]
        )

    @app.post("/predict/detect", summary="Detect objects in one image (multipart upload)")
    def detect(
        file: Annotated[UploadFile, File(description="an image PIL can read")],
        conf: Annotated[
            float | None, Query(ge=0, le=1, description="default: the model card's")
        ] = None,
        iou: Annotated[
            float | None, Query(ge=0, le=1, description="default: the model card's")
        ] = None,
    ) -> dict:
        return predict_detect(model("detect"), read_upload(file), conf, iou, cfg["max_pixels"])

    if ui:
        import gradio as gr

        from app.ui import build_ui

        app = gr.mount_gradio_app(
            app,
            build_ui(models, missing, cfg),
            path="",
            max_file_size=f"{cfg['max_upload_mb']}mb",
            allowed_paths=[],
            enable_monitoring=False,
            ssr_mode=False,
            mcp_server=False,
            footer_links=["api"],
        )
    return app


def main() -> None:
    import tempfile

    import uvicorn

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    cfg = serve_config()
    if cfg["workers"] > 1:
        # Before any worker imports prometheus_client: a fresh folder, so no counts of an
        # earlier run are summed in.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-")
    print(
        f"serving on http://{cfg['host']}:{cfg['port']} with {cfg['workers']} worker(s)  (UI: /, API docs: /docs)",
        file=sys.stderr,
        flush=True,
    )
    # A worker busy with models on a loaded machine can miss uvicorn's 5 s health ping and be
    # killed mid-request: allow it 30 s. Idle keep-alive connections stay open 75 s, longer
    # than clients and proxies keep theirs (httpx 5 s, nginx 60 s): when both sides use 5 s,
    # a client now and then sends on a connection the server is closing (ReadError).
    uvicorn.run(
        "app.server:create_app",
        factory=True,
        host=cfg["host"],
        port=cfg["port"],
        workers=cfg["workers"],
        log_level="warning",
        access_log=False,
        timeout_worker_healthcheck=30,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
