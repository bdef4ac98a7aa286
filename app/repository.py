"""The served models of one worker process, and Triton's model repository extension over
them: `POST /v2/repository/index` (what is loaded) and `POST
/v2/repository/models/{name}/load` with `parameters` `path` (a folder inside
serve.model_root) or `version` (a registry version), or none (what serve.model names).

Every load goes through app/loading.py (build, validate, warm); the worker that takes the
request publishes the folder in the shared state folder, swaps its own model, and answers
once every worker serves it; the others hear of it through their poller thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from app.auth import api_key
from app.canary import Candidate
from app.errors import BadInput
from app.loading import (
    HOW_TO_TRAIN,
    POLL_S,
    Generations,
    Source,
    build,
)
from app.predict import Limiter, Loaded
from app.settings import Settings
from stages.core import layout
from stages.core.params import TASKS


def registry_folder(task: str, model: str) -> Source:
    """The registry version that `model` (a version, or a stage) names, fetched into
    .cache/registry/<version>/<task> (the card gets `registry`, hence the version string)."""
    try:
        from tools import registry
    except ImportError as e:  # a serving-only install has neither DVC nor GTO
        raise BadInput(f"registry versions need the training install ({e})", 501) from None
    try:  # git, DVC and GTO each fail in their own ways (no repo, no tag, no cache)
        name, _ = registry.artifact(task)
        found = registry.resolve(name, model)
        if found is None:
            known = ", ".join(v["version"] for v in registry.versions(name)) or "none"
            raise BadInput(f"{name} has no version or stage {model!r} (registered: {known})", 404)
        version, commit = found
        out = Path(".cache/registry") / version
        info = {"artifact": name, "version": version, "commit": commit}
        if model != version:
            info["stage"] = model
        if not (out / task / layout.CARD_FILE).is_file():
            registry.fetch_version(task, commit, out, info)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - answered as the client's problem, named
        raise BadInput(f"registry: {model!r} for {task}: {type(e).__name__}: {e}", 422) from None
    return Source((out / task).resolve(), f"version {version}")


def inside(root: Path, path: str) -> Path:
    """`path` resolved inside root (symlinks followed), else a 403."""
    folder = (root / path).resolve()
    if not folder.is_relative_to(root):
        raise BadInput(f"path {path!r} resolves outside serve.model_root ({root}): refused", 403)
    return folder


class Repository:
    """{task: Loaded} as the routes see it (served.models, swapped per task), with the
    generation of each task this process serves."""

    def __init__(self, cfg: Settings, models_dir: Path, state_dir: Path | None = None):
        self.cfg, self.models_dir = cfg, Path(models_dir)
        self.root = Path(cfg.model_root or ".").resolve()
        self.limit = Limiter(cfg.concurrency, cfg.queue_timeout_s)
        self.gens = Generations(state_dir or Path(tempfile.mkdtemp(prefix="model-state-")))
        self.models: dict[str, Loaded] = {}
        self.missing: dict[str, str] = {}
        self.generation = dict.fromkeys(TASKS, 0)
        self.on_swap = []  # callbacks (task, Loaded, the Loaded it replaced): the metrics
        for task in TASKS:
            self.start(task)
        self.candidate = self.start_candidate()

    def start_candidate(self) -> Candidate | None:
        """serve.canary's candidate, built like any load (None: none named, or it failed)."""
        c = self.cfg.canary
        if not (c.path or c.version):
            return None
        named = {"path": c.path} if c.path else {"version": c.version}
        try:
            src = self.source(c.task, named)
            m = build(c.task, src.folder, self.cfg, self.limit, self.models.get(c.task))
        except BadInput as e:
            print(f"serve.canary: not loaded: {e}", file=sys.stderr, flush=True)
            return None
        return Candidate(c.task, m, c.share, self.cfg.shadow)

    def pick(self, task: str, caller: str) -> Loaded:
        """The model that answers this caller: the canary for its share, else the served one."""
        c = self.candidate
        return c.model if c is not None and c.answers(task, caller) else self.models[task]

    def mirror(self, task: str, used: Loaded, run, labels, answer) -> None:
        """Shadow mode: the candidate scores a copy (app/canary.py)."""
        if self.candidate is not None:
            self.candidate.mirror(task, used, run, labels, answer)

    def start(self, task: str) -> None:
        """At start-up: what the shared folder says the task serves (a worker that uvicorn
        restarted after a load), else the models folder."""
        now = self.gens.current(task)
        folder = Path(now["folder"]) if now else self.models_dir / task
        if not (folder / layout.CARD_FILE).is_file():
            self.missing[task] = (
                f"no {folder}/{layout.MODEL_ONNX_FILE} + {layout.CARD_FILE}: "
                + HOW_TO_TRAIN.format(task=task)
            )
        else:
            try:
                self.swap(task, build(task, folder, self.cfg, self.limit))
            except BadInput as e:  # a broken model must not stop the others from serving
                self.missing[task] = f"{folder}: could not load ({e})"
        self.generation[task] = now["generation"] if now else 0
        self.gens.ack(task, self.generation[task])

    def swap(self, task: str, m: Loaded) -> None:
        old = self.models.get(task)
        self.models[task] = m  # one assignment: requests in flight keep the one they hold
        self.missing.pop(task, None)
        for hook in self.on_swap:
            hook(task, m, old)

    def first(self, task: str) -> dict:
        """What start-up served (before any load): the history's first entry."""
        m = self.models.get(task)
        return {
            "folder": str((self.models_dir / task).resolve()),
            "named": "serve.model",
            "version": m.version if m else "",
        }

    def source(self, task: str, parameters: dict) -> Source:
        """The folder a load request names."""
        unknown = set(parameters) - {"path", "version", "rollback"}
        if unknown or len(parameters) > 1 or "rollback" in parameters:
            raise BadInput(
                "load parameters: at most one of `path` (a folder inside serve.model_root), "
                "`version` (a registry version) or `rollback` (true: the version served "
                f"before); got {sorted(parameters)}",
                400,
            )
        if "path" in parameters:
            return Source(inside(self.root, str(parameters["path"])), f"path {parameters['path']}")
        if "version" in parameters:
            return registry_folder(task, str(parameters["version"]))
        if self.cfg.model in ("", "workspace"):
            return Source(self.models_dir.resolve() / task, "serve.model")
        return registry_folder(task, self.cfg.model)

    def load(self, task: str, parameters: dict) -> dict:
        """Build, check and warm the named model, publish it, swap it in here, and wait for
        every worker to serve it. Blocking: call off the event loop."""
        with self.gens.lock():  # one load at a time, in every worker
            history = self.gens.history(task, self.first(task))
            if parameters.get("rollback") is True:  # back to what was served before
                if len(history) < 2:
                    raise BadInput(f"{task}: no earlier version to roll back to", 409)
                history = history[:-1]
                src = Source(Path(history[-1]["folder"]), history[-1]["named"])
            else:
                src = self.source(task, parameters)
            m = build(task, src.folder, self.cfg, self.limit, self.models.get(task))
            if parameters.get("rollback") is not True:
                history = [*history, {"folder": str(src.folder), "named": src.named}]
            history[-1] = {**history[-1], "version": m.version}
            generation = self.gens.publish(task, history)
            self.swap(task, m)
            self.generation[task] = generation
            self.gens.ack(task, generation)
        workers = self.gens.wait(task, generation, self.cfg.workers)
        return {"name": task, "version": m.version, "source": src.named, "workers": workers}

    def poll(self) -> None:
        """Load what other workers published (a poller thread calls this every POLL_S)."""
        for task in TASKS:
            now = self.gens.current(task)
            if not now or now["generation"] <= self.generation[task]:
                continue
            error = None
            try:
                m = build(task, Path(now["folder"]), self.cfg, self.limit, self.models.get(task))
                self.swap(task, m)
            except BadInput as e:
                error = str(e)
            self.generation[task] = now["generation"]
            self.gens.ack(task, now["generation"], error)

    def follow(self) -> None:
        """Load the version that serve.model's stage names when it moves (serve.reload_s)."""
        for task in list(self.models):
            try:
                src = registry_folder(task, self.cfg.model)
            except BadInput:  # no version in the stage (yet): keep serving
                continue
            if src.named != f"version {self.models[task].version}":
                self.load(task, {"version": src.named.split(" ", 1)[1]})

    def threads(self) -> None:
        """The poller (several workers) and the registry follower (serve.reload_s, a stage;
        one worker: the one that holds the follow lock)."""
        if self.cfg.workers > 1:
            every(POLL_S, self.poll, "model-poll")
        stage = self.cfg.model not in ("", "workspace") and not is_version(self.cfg.model)
        if self.cfg.reload_s > 0 and stage:
            lock = open(self.gens.folder / "follow.lock", "a")  # noqa: SIM115 - held for life
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another worker follows
                lock.close()
                return
            every(self.cfg.reload_s, self.follow, "registry-follow")


def load_models(models_dir: str | Path, cfg: Settings) -> tuple[dict[str, Loaded], dict[str, str]]:
    """({task: Loaded} for every model in models_dir, {task: why it is missing} for the rest):
    the start-up path, for tests and tools."""
    repo = Repository(cfg, Path(models_dir))
    return repo.models, repo.missing


def is_version(model: str) -> bool:
    return model.startswith("v") and model[1:2].isdigit()


def every(seconds: float, fn, name: str) -> None:
    """fn() every `seconds` in a daemon thread; an error is printed and the loop goes on."""

    def loop():
        while True:
            time.sleep(seconds)
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a failed poll must not end the thread
                print(f"{name}: {type(e).__name__}: {e}", flush=True)

    threading.Thread(target=loop, name=name, daemon=True).start()


def repository(request: Request) -> Repository:
    return request.app.state.repository


Repo = Annotated[Repository, Depends(repository)]
LOAD_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "path": {"type": "string"},
                                "version": {"type": "string"},
                                "rollback": {"type": "boolean"},
                            },
                        }
                    },
                }
            }
        },
    }
}
router = APIRouter(prefix="/v2/repository", tags=["Model repository (Triton's extension)"])


@router.post("/index", summary="The models and the version each serves")
def index(repo: Repo) -> list[dict]:
    out = [
        {"name": t, "version": m.version, "state": "READY", "reason": ""}
        for t, m in sorted(repo.models.items())
    ]
    if repo.candidate is not None:
        c = repo.candidate
        out.append(
            {"name": c.task, "version": c.model.version, "state": "READY", "reason": "candidate"}
        )
    out += [
        {"name": t, "version": "", "state": "UNAVAILABLE", "reason": why}
        for t, why in sorted(repo.missing.items())
    ]
    return out


@router.post(
    "/models/{name}/load",
    dependencies=[Depends(api_key)],
    openapi_extra=LOAD_BODY,
    summary="Load a model version on every worker: parameters.path (a folder inside "
    "serve.model_root) or parameters.version (registry), none: what serve.model names",
)
async def load(name: str, repo: Repo, request: Request) -> dict:
    if name not in TASKS:
        raise BadInput(f"no model named {name!r}; the models: {', '.join(TASKS)}", 404)
    raw = await request.body()  # tritonclient sends JSON without a content type
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"the body is not JSON ({e})", 400) from None
    parameters = (body.get("parameters") if isinstance(body, dict) else None) or {}
    if not isinstance(parameters, dict):
        raise BadInput("`parameters` must be an object", 400)
    return await run_in_threadpool(repo.load, name, parameters)


def state_dir() -> Path | None:
    """APP_STATE_DIR: the folder the workers share (app.server.main makes one)."""
    folder = os.environ.get("APP_STATE_DIR")
    return Path(folder) if folder else None
