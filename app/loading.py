"""Loading a task's served model: the one path that builds, validates, warms and swaps it in,
at start-up and on a running server (POST /v2/repository/models/{name}/load, the registry
follower, rollback).

A load is built and warmed off the request path, then swapped in by one dict assignment:
a request holds the Loaded it started with, so requests in flight finish on their version.
A model that fails to build (a truncated ONNX, a card that does not validate, features that
differ from the served model's) raises BadInput naming the problem, and nothing changes.

Workers (uvicorn processes) hear of a load through a shared folder (APP_STATE_DIR, made by
app.server.main): the worker that loads writes `<task>.json` (a generation number and the
folder to serve) and every worker's poller thread, which stats that file every POLL_S,
builds the same folder and writes `ack/<task>.<pid>` (the generation it now serves). The
load answers once every live worker has acked. docs/serving.md says more.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import ValidationError

from app.errors import BadInput
from app.monitor import Monitor
from app.predict import Limiter, Loaded
from app.settings import Settings
from stages.core import layout
from stages.core.card import Card, read_card
from stages.core.files import pid_alive, write_json
from stages.core.inference import open_session, physical_cores
from stages.tabular.serving import Rows

HISTORY = 20  # versions each task remembers, for rollback
POLL_S = 0.2  # how often a worker looks for a load another worker published
ACK_TIMEOUT_S = 120  # how long a load waits for every worker to serve it
HOW_TO_TRAIN = (
    "run `make run` (or `dvc repro infer@{task}`, or `dvc pull` from a remote that has it)"
)
# What serving reads from a card, by task (a card without one of these does not validate).
NEEDS = {
    "tabular": ("target", "features"),
    "image": ("kind", "classes", "preprocessing.image_size"),
    "detect": ("kind", "classes", "preprocessing.imgsz", "postprocessing.conf"),
}


class Source(NamedTuple):
    """What to serve: a folder with model.json and its ONNX file, and how it was named."""

    folder: Path
    named: str  # "serve.model", "path models/x", "version v0.0.2"


def field(card: Card, dotted: str):
    """A card field by its dotted name (attributes, then keys of dict fields), or None."""
    node = card
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
    return node


def read_checked(folder: Path, task: str) -> Card:
    """The folder's model card, checked for what serving reads; BadInput names the problem."""
    path = folder / layout.CARD_FILE
    if not path.is_file():
        raise BadInput(
            f"{folder}: no {layout.CARD_FILE} (a model folder holds {layout.MODEL_ONNX_FILE} + {layout.CARD_FILE})"
        )
    try:
        card = read_card(path)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "the card"
        raise BadInput(f"{path}: the card does not validate: {where}: {err['msg']}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{path}: not JSON ({e})") from None
    if card.task != task:
        raise BadInput(f"{path}: a card for task {card.task!r}, not {task!r}")
    for dotted in NEEDS[task]:
        if field(card, dotted) is None:
            raise BadInput(f"{path}: the card has no {dotted}")
    if not field(card, "registry.version") and not field(card, "provenance.model_md5"):
        raise BadInput(f"{path}: the card has neither registry.version nor provenance.model_md5")
    return card


def open_checked(folder: Path, card: Card, threads: int):
    """The card's ONNX file as an onnxruntime session, if it is the file the card describes."""
    path = folder / card.onnx.file
    if not path.is_file():
        raise BadInput(f"{folder}: no {card.onnx.file} beside {layout.CARD_FILE}")
    if hashlib.sha256(path.read_bytes()).hexdigest() != card.onnx.sha256:
        raise BadInput(f"{path}: not the file its card describes (sha256 differs: cut short?)")
    try:  # Spinning threads would burn the cores between requests of a shared server.
        return open_session(path, threads=threads, spinning=False)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
        raise BadInput(f"{path}: onnxruntime cannot load it ({type(e).__name__})") from None


def warm(session) -> None:
    """One run on zeros of each input's shape (free dimensions 1): the first run's
    allocations and kernel choices happen here, not in a request."""
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feed[i.name] = np.zeros(shape, np.int64 if "int64" in i.type else np.float32)
    try:
        session.run(None, feed)
    except Exception as e:  # noqa: BLE001 - a graph that cannot run on its own input shape
        raise BadInput(f"the model does not run on a batch of zeros ({type(e).__name__})") from None


def features(card: Card) -> list[tuple]:
    """What the request model and the UI form were built from: each feature's name, type
    and categories."""
    return [(f.name, f.type, tuple(f.categories or ())) for f in card.features]


def compatible(old: Loaded | None, card: Card) -> None:
    """BadInput unless the card answers the requests the served model does."""
    if old is None:
        return
    if card.kind != old.card.kind:
        raise BadInput(f"a {card.kind} model cannot replace a {old.card.kind} model")
    if card.task == "tabular" and features(card) != features(old.card):
        new, was = features(card), features(old.card)
        diff = [f"{n} ({t})" for n, t, _ in new if (n, t) not in {(a, b) for a, b, _ in was}]
        gone = [n for n, *_ in was if n not in {a for a, *_ in new}]
        cats = [n for (n, t, c) in new for (m, u, d) in was if n == m and t == u and c != d]
        raise BadInput(
            "the features differ from the served model's (the request schema and the UI form "
            f"were built for those): new or retyped {diff or 'none'}, gone {gone or 'none'}, "
            f"other categories {cats or 'none'}"
        )


def build(task: str, folder: Path, cfg: Settings, limit: Limiter, old: Loaded | None = None):
    """A Loaded for the folder's model, checked against the served one and warmed."""
    card = read_checked(folder, task)
    compatible(old, card)
    session = open_checked(folder, card, max(1, physical_cores() // cfg.workers))
    warm(session)
    return Loaded(
        card,
        session,
        Monitor(task, card, cfg),
        limit,
        Rows(card) if task == "tabular" else None,
        cfg.tabular_batch_size if task == "tabular" else 1,
    )


@contextmanager
def locked(path: Path):
    """An exclusive lock on a file, between processes and threads alike."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Generations:
    """The shared folder: which folder each task serves (generation n), and which generation
    each worker process serves."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "ack").mkdir(parents=True, exist_ok=True)

    def lock(self):
        return locked(self.folder / "lock")

    def current(self, task: str) -> dict | None:
        path = self.folder / f"{task}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def history(self, task: str, first: dict) -> list[dict]:
        """What the task served before, oldest first, ending with what it serves now
        ({folder, named, version}; first: what start-up served, before any load)."""
        now = self.current(task)
        return now["history"] if now else [first]

    def publish(self, task: str, history: list[dict]) -> int:
        """The next generation of the task: it serves history[-1] (call under lock())."""
        now = self.current(task)
        generation = (now["generation"] if now else 0) + 1
        history = history[-HISTORY:]
        entry = {"generation": generation, **history[-1], "history": history}
        write_json(self.folder / f"{task}.json", entry)
        return generation

    def ack(self, task: str, generation: int, error: str | None = None) -> None:
        write_json(
            self.folder / "ack" / f"{task}.{os.getpid()}",
            {"generation": generation, "error": error},
        )

    def acks(self, task: str) -> dict[int, dict]:
        """{pid: its ack} for the live worker processes."""
        out = {}
        for path in (self.folder / "ack").glob(f"{task}.*"):
            pid = int(path.suffix[1:])
            if pid_alive(pid):
                try:
                    out[pid] = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):  # replaced as we read: next time
                    continue
        return out

    def wait(self, task: str, generation: int, workers: int) -> int:
        """Block until `workers` live processes serve the generation; returns how many do.
        BadInput when a worker could not load it or the wait runs out."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            acks = self.acks(task)
            failed = [
                a["error"] for a in acks.values() if a["generation"] == generation and a["error"]
            ]
            if failed:
                raise BadInput(f"a worker could not load it: {failed[0]}", 500)
            done = sum(1 for a in acks.values() if a["generation"] >= generation)
            if done >= workers:
                return done
            if time.monotonic() > deadline:
                raise BadInput(f"loaded on {done} of {workers} workers in {ACK_TIMEOUT_S} s", 504)
            time.sleep(POLL_S / 2)
