"""The server's settings: one frozen, typed object, the params schema's `serve` section
(stages/core/schema.py Serve: its keys, types and ranges, written once) plus what serving reads
from other sections, with the APP_* environment variables on top (pydantic-settings). Every
key is required in params.yaml (the one source of the values), so nothing in app/ falls back to
a literal of its own.

    APP_HOST, APP_PORT, APP_WORKERS   override serve.host / port / workers
    APP_MODELS_DIR                    the models folder (make serve: a fetched registry version)
    APP_API_KEYS                      keys for the predict and v2 infer routes: comma-separated,
                                      or the path of a file with one key per line (or commas)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from stages.core.params import load_params
from stages.core.schema import Params, Positive, Serve, plain

# The only variables read: the rest of serve: is params.yaml's alone.
ENV = ("host", "port", "workers", "models_dir", "api_keys")


class SettingsError(ValueError):
    """A serve key or APP_* variable is missing or of the wrong type: one line naming it."""


class _OnlyEnv(EnvSettingsSource):
    """APP_* variables for the fields in ENV, none for the others."""

    def __call__(self) -> dict:
        return {k: v for k, v in super().__call__().items() if k in ENV}


class Settings(BaseSettings, Serve):
    # Not strict (unlike params.yaml): an environment variable is a string ("9000").
    model_config = SettingsConfigDict(env_prefix="APP_", frozen=True, strict=False, extra="forbid")

    # tabular.infer.batch_size: rows per onnxruntime run, as batch infer runs them
    tabular_batch_size: Positive
    # image.infer.top_k: classes listed per image, as batch infer lists them
    top_k: Positive
    # From the environment only (a path of this machine, and secrets).
    models_dir: str = "models"
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_):
        return (_OnlyEnv(settings_cls), init_settings)  # the environment wins over params.yaml

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value):
        return parse_api_keys(value) if isinstance(value, str) else value

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def replace(self, **changes) -> Settings:
        return self.model_copy(update=changes)


def parse_api_keys(value: str) -> tuple[str, ...]:
    """APP_API_KEYS: comma-separated keys, or the path of a file of keys (lines or commas)."""
    value = value.strip()
    if value and Path(value).is_file():
        value = Path(value).read_text().replace("\n", ",")
    return tuple(k.strip() for k in value.split(",") if k.strip())


def from_params(params: Params) -> Settings:
    """Settings from checked params and the APP_* environment variables."""
    try:
        return Settings(
            **plain(params.serve),
            tabular_batch_size=params.tabular.infer.batch_size,
            top_k=params.image.infer.top_k,
        )
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        key = ".".join(map(str, err["loc"]))
        name = f"APP_{key.upper()}" if key in ENV else f"serve.{key}"
        raise SettingsError(f"{name}: {err['input']!r}: {err['msg']}") from None


def load_settings(params_path: str | Path = "params.yaml") -> Settings:
    return from_params(load_params(params_path))
