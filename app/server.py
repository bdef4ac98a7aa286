"""The model server: a REST API, the Open Inference Protocol v2 and the Gradio app on one
port, torch-free.

    make serve          # = python -m app.server → http://127.0.0.1:7860 (UI), /docs (API)

Settings come from params.yaml `serve:` and APP_* variables (app/settings.py). uvicorn builds
the app in each worker process from the import string `app.server:create_app` (factory
mode); with more than one worker the Prometheus metrics go through multiprocess mode
(PROMETHEUS_MULTIPROC_DIR), so /metrics sums the counters of all workers. A missing model
does not stop the server: /ready and its tab say what is missing.

Routes: app/routes.py (REST), app/v2.py (v2), module-level routers that reach what is served
through a dependency (app.state.served); the HTTP edge (request IDs, access log and metrics,
500s, HEAD, 405, body limit), one small middleware each: app/edge.py; metrics:
app/metrics.py; API keys: app/auth.py.
"""

import logging
import os
import sys
from pathlib import Path

from fastapi import FastAPI

from app import edge, repository, routes, v2
from app.auth import encoded
from app.metrics import Metrics
from app.repository import Repository, state_dir
from app.routes import Served, install_handlers, tabular_openapi, tabular_request
from app.settings import Settings, SettingsError, load_settings
from stages.core.cli import StageError

VERSION = "0.1.0"


def api(cfg: Settings, models_dir: str | Path) -> FastAPI:
    """The API without the UI: /docs and /redoc with their assets served by the app itself
    (fastapi-offline), so they work on an offline host."""
    from fastapi_offline import FastAPIOffline

    repo = Repository(cfg, Path(models_dir), state_dir())
    models, missing = repo.models, repo.missing
    app = FastAPIOffline(
        title="model-train",
        version=VERSION,
        description="Predictions from the exported ONNX models (tabular, image, detect), as "
        "REST routes and as the Open Inference Protocol v2 (/v2). With APP_API_KEYS set, "
        "the predict and infer routes need `Authorization: Bearer <key>`.",
    )
    metrics = Metrics(models, missing, cfg)
    repo.on_swap.append(metrics.adopt)
    if repo.candidate is not None:
        metrics.adopt(repo.candidate.task, repo.candidate.model, role="candidate")
        repo.candidate.on_shadow.append(metrics.shadowed)
    served = Served(
        repo,
        cfg,
        metrics,
        tabular_request(models["tabular"].card if "tabular" in models else None, cfg.max_rows),
        VERSION,
    )
    app.state.models, app.state.missing, app.state.config = models, missing, cfg
    app.state.served, app.state.api_keys = served, encoded(cfg.api_keys)
    app.state.repository = repo
    routers = [routes.info, routes.predict, v2.router, repository.router]
    for router in routers:
        app.include_router(router)
    install_handlers(app)
    tabular_openapi(app, served.tabular_model)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    add_edge(app, cfg, served.metrics, routers)
    repo.threads()
    return app


def add_edge(app: FastAPI, cfg: Settings, metrics: Metrics, routers: list) -> None:
    """The edge middlewares (app/edge.py); the last added runs first."""
    app.add_middleware(edge.BodyLimit, max_bytes=cfg.max_bytes, max_upload_mb=cfg.max_upload_mb)
    # The routers' own routes: FastAPI keeps included routers nested in app.router.
    every = lambda: [*app.router.routes, *(r for router in routers for r in router.routes)]  # noqa: E731
    app.add_middleware(edge.WrongMethod, routes_of=every)
    app.add_middleware(edge.HeadAsGet)
    app.add_middleware(edge.ServerErrors)
    app.add_middleware(edge.AccessLog, metrics=metrics)
    app.add_middleware(edge.RequestId)


def create_app(
    models_dir: str | Path | None = None, params_path: str | Path = "params.yaml", ui: bool = True
) -> FastAPI:
    """The app; models_dir defaults to APP_MODELS_DIR, else `models` (make serve fetches a
    registered version and names it in APP_MODELS_DIR)."""
    cfg = load_settings(params_path)
    if models_dir is not None:
        cfg = cfg.replace(models_dir=str(models_dir))
    app = api(cfg, cfg.models_dir)
    # With API keys on, the UI stays off: it would run the models for anyone who can reach it.
    if ui and not cfg.api_keys:
        import gradio as gr

        from app.ui import build_ui, page_style

        app = gr.mount_gradio_app(
            app,
            build_ui(app.state.models, app.state.missing, cfg),
            path="",
            max_file_size=f"{cfg.max_bytes}b",
            allowed_paths=[],
            enable_monitoring=False,
            ssr_mode=False,
            mcp_server=False,
            footer_links=["api"],
            **page_style(),
        )
    return app


def main() -> None:
    import tempfile

    import uvicorn

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    try:
        cfg = load_settings()
    except (SettingsError, StageError) as e:  # one line naming the key, no traceback
        raise SystemExit(f"error: {e}") from None
    if cfg.workers > 1:
        # Before any worker imports prometheus_client: a fresh folder, so no counts of an
        # earlier run are summed in.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-")
    # The folder through which the workers hear of a model load (app/loading.py).
    os.environ["APP_STATE_DIR"] = tempfile.mkdtemp(prefix="model-state-")
    keys = f", {len(cfg.api_keys)} API key(s)" if cfg.api_keys else ""
    print(
        f"serving on http://{cfg.host}:{cfg.port} with {cfg.workers} worker(s){keys}  "
        "(UI: /, API docs: /docs, v2: /v2)",
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
        host=cfg.host,
        port=cfg.port,
        workers=cfg.workers,
        log_level="warning",
        access_log=False,
        timeout_worker_healthcheck=30,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
