"""What every stage shares: params, one-line user errors, atomic writes, JSON, git revision.

Torch-free on purpose: `infer` and `app/` import this module too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

PARAMS_FILE = "params.yaml"
_UMASK = os.umask(0)
os.umask(_UMASK)
TASKS = ("tabular", "image", "detect")


class StageError(Exception):
    """Bad input or configuration: the stage prints this one line and exits 1 (no traceback)."""


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def task_from_argv(argv: list[str], tasks=TASKS) -> str:
    if len(argv) != 1 or argv[0] not in tasks:
        raise StageError(f"usage: python -m <stage> TASK, where TASK is one of: {', '.join(tasks)}")
    return argv[0]


def run_main(main: Callable[[list[str]], Any]) -> None:
    """Entry point of every stage: user errors become `error: ...` and exit status 1."""
    try:
        main(sys.argv[1:])
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_stage(by_task: dict[str, Callable[[dict], Any]]) -> None:
    """`python -m stages.<stage> TASK`: call by_task[TASK](params) through run_main."""
    run_main(lambda argv: by_task[task_from_argv(argv, by_task)](load_params()))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds.

    A killed or failing stage therefore never leaves a half-written file, and the
    previous version stays in place until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def git_revision() -> str:
    """HEAD's commit, with `-dirty` when tracked files differ; `unknown` outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
