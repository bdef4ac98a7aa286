"""Typed views of the JSON documents the pipeline writes and reads (the model card, the
tabular columns, the checkpoint meta), and how they keep their bytes.

A Document is read with `Doc.model_validate(obj)` and written with `.dump()`: the same keys
in the same order, a number spelt as it was (10, not 10.0), so a document that goes through
its model is written byte for byte as before. Keys a model does not name (a newer writer's)
are kept (extra="allow"): a reader of a public file never fails on an added field.
Torch-free: infer and app/ read the card.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from stages.core.files import read_json, write_json


def as_read(value, read):
    """value (a dump) in the key order and number spelling of what was read, where it still
    equals it (a model_copy(update=...) changes values: those are the new ones)."""
    if isinstance(value, dict) and isinstance(read, dict):
        order = [k for k in read if k in value] + [k for k in value if k not in read]
        return {k: as_read(value[k], read.get(k)) for k in order}
    if isinstance(value, list) and isinstance(read, list) and len(value) == len(read):
        return [as_read(v, r) for v, r in zip(value, read, strict=True)]
    if type(value) is not type(read) and value == read and not isinstance(read, bool):
        return read
    return value


class KeepsRead(BaseModel):
    """A model that remembers the mapping it was read from, for as_read (params' sections
    too: stages/core/schema.py plain)."""

    _read: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_read(cls, data, handler):
        model = handler(data)
        if isinstance(data, dict):
            model._read = data
        return model

    def dump(self) -> dict:
        """JSON-ready data by the file's names (aliases): the keys it was given (none of the
        defaults it filled in), in their order and spelling."""
        return as_read(self.model_dump(mode="json", by_alias=True, exclude_unset=True), self._read)


class Document(KeepsRead):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @classmethod
    def read(cls, path: str | Path):
        return cls.model_validate(read_json(path))

    def write(self, path: str | Path) -> None:
        write_json(path, self.dump())


class Feature(Document):
    """A tabular input column: in the prepared columns and in the model card's `features`."""

    name: str
    type: str  # numeric, categorical, datetime or text (stages/tabular/roles.py)
    format: str | None = None  # datetime: the strptime format its values were read with
    categories: list | None = None  # categorical, in the card: the one-hot order


class Prepared(Document):
    """What prepare writes beside a task's splits (layout.columns): every task's has these."""

    source: str
    rows: dict[str, int] = {}  # per split
    params: dict = {}  # the params prepare ran with, as params.yaml spells them


class Columns(Prepared):
    """Tabular prepare's description of the table: the target, the task and the features."""

    target: str
    task: str  # classification | regression
    task_why: str | None = None
    features: list[Feature]
    classes: list | None = None  # classification: the target's values, sorted
    dropped_rows: dict | None = None
    columns: list[dict] | None = None  # every column's role and why (stages/tabular/roles.py)
    warnings: list | None = None


class ImageIndex(Prepared):
    """Image prepare's description of the images beside index.parquet."""

    root: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]


class Meta(Document):
    """What train stores beside the weights in models/<task>/model.pt (stages/core/job.py),
    which evaluate and export read back."""

    task: str | None = None
    arch: dict = {}
    prepared: dict = Field(alias="schema")  # what prepare wrote (Columns, ImageIndex, ...)
    preprocessor: dict | None = None  # tabular: Preprocessor.to_dict()
    target_scaling: dict | None = None
    train: dict = {}  # the loop's summary
    params: dict = {}

    def columns(self) -> Columns:
        """The tabular prepared columns this model was trained on."""
        return Columns.model_validate(self.prepared)
