"""The typed documents (stages/core/documents.py, the card in stages/core/card.py): a
document read and written through its model keeps its bytes, and a field that a newer writer
added survives a reader that does not know it."""

from __future__ import annotations

import json

import pytest
from conftest import params_with
from pydantic import ValidationError

from stages.core.card import Card, read_card, write_card
from stages.core.documents import Columns, Meta

CARD = {
    "task": "tabular",
    "kind": "classification",
    "provenance": {"model_md5": "ab", "stage": "train@tabular", "deps": None, "params": None},
    "onnx": {"file": "model.onnx", "sha256": "cd", "input": "x", "output": "y", "input_shape": []},
    "metrics": {"test": {"accuracy": 1}},  # an int where a float might be: kept as written
    "params": {"image.train": {"augment": {"rotate": 10}}},
    "target": "species",
    "classes": ["a", "b"],
    "features": [
        {"name": "n", "type": "numeric"},
        {"type": "categorical", "name": "c", "categories": ["x"], "later": 1},
    ],
    "target_scaling": None,
    "from_a_newer_writer": {"any": [1, 2.5]},
    "trust": {"alpha": 0.1},
}


def test_a_card_keeps_its_bytes_and_unknown_fields(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(CARD, indent=2) + "\n")
    card = read_card(path)
    assert card.features[1].categories == ["x"] and card.onnx.file == "model.onnx"
    assert card.reference is None and card.registry is None  # not in the file: defaults
    write_card(tmp_path / "again.json", card)
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    moved = card.model_copy(update={"registry": {"version": "v1"}})
    assert moved.dump() == {**CARD, "registry": {"version": "v1"}}
    with pytest.raises(ValidationError, match="onnx"):
        Card.model_validate({k: v for k, v in CARD.items() if k != "onnx"})


def test_columns_and_meta_read_what_prepare_and_train_wrote():
    columns = {
        "source": "t.csv",
        "target": "y",
        "task": "classification",
        "features": [{"name": "d", "type": "datetime", "format": "%Y"}],
        "classes": ["0", "1"],
        "rows": {"train": 3, "val": 1, "test": 1},
        "params": {"seed": 1},
    }
    meta = Meta.model_validate({"task": "tabular", "arch": {"name": "net"}, "schema": columns})
    assert meta.columns().features[0].format == "%Y"
    assert meta.dump()["schema"] == columns  # the checkpoint keeps its key
    assert Columns.model_validate(columns).dump() == columns


def test_params_stay_strict_where_documents_are_lax():
    from stages.core.cli import StageError

    with pytest.raises(StageError, match="unknown key"):
        params_with({"tabular.train.newer": 1})
