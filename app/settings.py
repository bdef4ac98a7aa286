"""The server's settings: one frozen, typed object built once from params.yaml `serve:` and the
APP_* environment variables. Every key is required (params.yaml is the one source of the
values), so nothing in app/ falls back to a literal of its own.

    APP_HOST, APP_PORT, APP_WORKERS   override serve.host / port / workers
    APP_MODELS_DIR                    the models folder (make serve: a fetched registry version)
    APP_API_KEYS                      keys for the predict and v2 infer routes: comma-separated,
                                      or the path of a file with one key per line (or commas)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

from stages.core.params import load_params


class SettingsError(ValueError):
    """A serve key or APP_* variable is missing or of the wrong type: one line naming it."""


@dataclass(frozen=True)
class Settings:
    model: str
    host: str
    port: int
    max_upload_mb: float
    max_pixels: int
    max_rows: int
    cors_origins: tuple[str, ...]
    workers: int
    concurrency: int
    queue_timeout_s: float
    strict: bool
    drift_window: int
    drift_threshold: float
    request_log_dir: str
    request_log_sample: float
    request_log_mb: float
    request_log_backups: int
    gradio_cache_s: int
    model_root: str
    reload_s: float
    canary: dict
    shadow: bool
    # tabular.infer.batch_size: rows per onnxruntime run, as batch infer runs them
    tabular_batch_size: int
    # image.infer.top_k: classes listed per image, as batch infer lists them
    top_k: int
    # From the environment only (a path of this machine, and secrets).
    models_dir: str = "models"
    api_keys: tuple[str, ...] = ()

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


NOT_SERVE = {"models_dir", "api_keys", "tabular_batch_size", "top_k"}


def _typed(name: str, value, kind: str):
    """value as the field's type, or a SettingsError naming the key (dotted)."""
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "dict":
            value = value.model_dump() if hasattr(value, "model_dump") else value
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if kind == "tuple[str, ...]":
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if isinstance(value, bool):
            raise TypeError
        return {"int": int, "float": float, "str": str}[kind](value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: {value!r} is not a {kind}") from None


def parse_api_keys(value: str) -> tuple[str, ...]:
    """APP_API_KEYS: comma-separated keys, or the path of a file of keys (lines or commas)."""
    value = value.strip()
    if value and Path(value).is_file():
        value = Path(value).read_text().replace("\n", ",")
    return tuple(k.strip() for k in value.split(",") if k.strip())


def from_mapping(serve: dict, batch_size: int, top_k: int, environ: dict | None = None) -> Settings:
    """Settings from a params.yaml `serve:` mapping, tabular.infer.batch_size and an
    environment (default: os.environ)."""
    env = os.environ if environ is None else environ
    serve = {
        **serve,
        **{
            k: env[f"APP_{k.upper()}"]
            for k in ("host", "port", "workers")
            if f"APP_{k.upper()}" in env
        },
    }
    wanted = [f for f in fields(Settings) if f.name not in NOT_SERVE]
    missing = [f.name for f in wanted if f.name not in serve]
    if missing:
        raise SettingsError(f"params.yaml serve: missing {', '.join(missing)}")
    values = {f.name: _typed(f"serve.{f.name}", serve[f.name], f.type) for f in wanted}
    values["tabular_batch_size"] = _typed("tabular.infer.batch_size", batch_size, "int")
    values["top_k"] = _typed("image.infer.top_k", top_k, "int")
    if "APP_MODELS_DIR" in env:
        values["models_dir"] = env["APP_MODELS_DIR"]
    values["api_keys"] = parse_api_keys(env["APP_API_KEYS"]) if "APP_API_KEYS" in env else ()
    for name in ("port", "workers", "concurrency", "max_rows", "top_k", "max_pixels"):
        if values[name] < 1:
            raise SettingsError(f"serve.{name}: {values[name]} must be at least 1")
    return Settings(**values)


def load_settings(params_path: str | Path = "params.yaml") -> Settings:
    params = load_params(params_path)
    return from_mapping(
        params["serve"],
        params["tabular"]["infer"]["batch_size"],
        params["image"]["infer"]["top_k"],
    )
