"""Writing outputs safely: atomic files and folders (a killed stage never leaves half a
file, and the previous version stays until the new one is complete), JSON, run timings.
Torch-free."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete the temporary siblings `.NAME.PID.XXXXXXXX.tmp` of `path` whose writer is gone.

    SIGKILL (or a power cut) skips the clean-up below, and each kill used to leave one
    more copy of the output beside it (in models/<task>/checkpoints/ a whole model each).
    The PID in the name spares writers that are still running; names without one are from
    before it was added.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp")
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and not (m.group(1) and pid_alive(int(m.group(1)))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds.

    A killed or failing stage therefore never leaves a half-written file, and the
    previous version stays in place until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like atomic_path, for a directory: build it under a temporary name, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)  # killed between the two renames below: the previous version is back
    tmp = Path(
        tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    )
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    """json.dumps' `default`: a typed model (a params section, a document) as it was read:
    its dump() (stages/core/documents.py KeepsRead). Duck-typed, so that this module, which
    documents.py builds on, imports neither."""
    dump = getattr(obj, "dump", None)
    if callable(dump):
        return dump()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def timing_path(name: str) -> Path:
    return Path(".cache/timings") / f"{name}.json"


def write_timing(name: str, stats: dict) -> None:
    """A run's timings go to .cache/timings/<name>.json (git- and DVC-ignored), never into
    a tracked output: they differ on every run and would make every rerun look like a change."""
    write_json(timing_path(name), stats)
