"""How a stage or tool talks to its user: one-line errors (StageError, exit 1, no
traceback) and log lines on stderr. Torch-free."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class StageError(Exception):
    """Bad input or configuration: the stage prints this one line and exits 1 (no traceback)."""


def run_main(main: Callable[[list[str]], Any]) -> None:
    """Entry point of every stage and tool: user errors become `error: ...` and exit status 1."""
    try:
        main(sys.argv[1:])
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
