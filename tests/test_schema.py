"""params.yaml against its schema (stages/core/schema.py): a misspelt key, a wrong type or a
value out of range stops a stage with one line naming the dotted key, and docs/params.md
documents exactly the schema's keys."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run, set_params

from stages.core import schema
from stages.core.cli import StageError
from stages.core.params import load_params


def test_params_yaml_matches_the_schema():
    load_params(ROOT / "params.yaml")  # raises on any problem


@pytest.fixture
def params_repo(tmp_path: Path) -> Path:
    """A folder with params.yaml only: `python -m stages` must fail on it before any work."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def rename(repo: Path, dotted: str, new: str) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[new] = node.pop(leaf)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            ("rename", "tabular.train.hidden", "hiden"),
            "params.yaml: tabular.train.hiden: unknown key (did you mean tabular.train.hidden?)",
        ),
        (
            ("rename", "serve.max_rows", "max_row"),
            "params.yaml: serve.max_row: unknown key (did you mean serve.max_rows?)",
        ),
        (
            ("rename", "image.train.augment.rotate", "rotation"),
            "params.yaml: image.train.augment.rotation: unknown key "
            "(did you mean image.train.augment.rotate?)",
        ),
        (
            ("set", "image.train.epochs", "eighty"),
            "params.yaml: image.train.epochs: input should be a valid integer (it is 'eighty')",
        ),
        (
            ("set", "serve.strict", 1),
            "params.yaml: serve.strict: input should be a valid boolean (it is 1)",
        ),
        (
            ("set", "tabular.train.scheduler", "cosin"),
            "params.yaml: tabular.train.scheduler: input should be 'cosine', 'step', 'plateau' or "
            "'none' (it is 'cosin')",
        ),
        (
            ("set", "tabular.data.split.test", 1.5),
            "params.yaml: tabular.data.split.test: input should be less than 1 (it is 1.5)",
        ),
        (
            ("set", "image.train.augment.scale", [0.9, -1]),
            "params.yaml: image.train.augment.scale[1]: input should be greater than 0 (it is -1)",
        ),
    ],
    ids=[
        "unknown-train",
        "unknown-serve",
        "unknown-nested",
        "type",
        "bool",
        "choice",
        "range",
        "list-item",
    ],
)
def test_a_bad_key_gives_one_line(params_repo: Path, change: tuple, line: str):
    kind, dotted, value = change
    if kind == "rename":
        rename(params_repo, dotted, value)
    else:
        set_params(params_repo, {dotted: value})
    with pytest.raises(StageError) as e:
        load_params(params_repo / "params.yaml")
    assert str(e.value) == line


@pytest.mark.parametrize(
    "change",
    [
        {"image.train.augment.rotat": 10},  # unknown
        {"image.train.epochs": "80"},  # wrong type
        {"tabular.train.dropout": 1.5},  # out of range
    ],
    ids=["unknown", "type", "range"],
)
def test_python_m_stages_exits_1_with_one_line(params_repo: Path, change: dict):
    """The real CLI, in a folder with params.yaml alone: it must fail before doing any work."""
    set_params(params_repo, change)
    res = run(params_repo, "python", "-m", "stages", "train", "tabular", check=False, timeout=120)
    assert res.returncode == 1, res
    (dotted,) = change
    assert res.stderr.startswith(f"error: params.yaml: {dotted}: "), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def raw_params() -> dict:
    """params.yaml as read, before the schema: what a test edits to break it."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_a_missing_key_and_a_missing_section():
    params = raw_params()
    del params["image"]["validate"]["modes"]
    with pytest.raises(StageError, match=r"^params.yaml: image.validate.modes: missing$"):
        schema.validate(params)
    del params["serve"], params["image"]
    with pytest.raises(StageError, match=r"^params.yaml: image: missing \(and 1 more\)$"):
        schema.validate(params)


def test_the_values_stages_read_keep_their_types():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params.tabular.train.grad_clip, float)
    assert params.tabular.train.epochs == "auto" and params.seed == 42
    # what outputs record: params.yaml's own keys, order and numbers (rotate: 10, not 10.0)
    assert schema.plain(params) == raw_params()
    assert repr(schema.plain(params)) == repr(raw_params())
    # frozen, and no mapping access: settings are attributes; other values a new object
    with pytest.raises(ValueError, match="frozen"):
        params.tabular.train.lr = 0.1
    with pytest.raises(TypeError):
        params["tabular"]
    assert schema.replaced(params, {"tabular.train.lr": 0.1}).tabular.train.lr == 0.1


def test_overridden_is_what_a_sweep_would_run():
    params = raw_params()
    schema.validate(schema.overridden(params, {"tabular.train.lr": 0.1}))
    with pytest.raises(StageError, match="did you mean tabular.train.lr"):
        schema.validate(schema.overridden(params, {"tabular.train.lrr": 0.1}))
    assert params["tabular"]["train"]["lr"] == 0.003  # the original is untouched


def documented_keys(text: str) -> set[str]:
    """The keys of docs/params.md's table: `a.b.c` / `d` / `e` in a row's first cell names
    a.b.c, a.b.d and a.b.e."""
    keys = set()
    for row in text.splitlines():
        if not row.startswith("| `"):
            continue
        first, *siblings = re.findall(r"`([^`]+)`", row.split("|")[1])
        keys.add(first)
        parent = first.rpartition(".")[0]
        keys.update(f"{parent}.{s}" for s in siblings)
    return keys


def test_docs_params_md_documents_exactly_the_schema():
    documented = documented_keys((ROOT / "docs/params.md").read_text())
    schema_keys = set(schema.leaf_keys())
    assert sorted(schema_keys - documented) == [], "schema keys missing from docs/params.md"
    assert sorted(documented - schema_keys) == [], "docs/params.md keys not in the schema"


def test_tune_and_sweep_specs_are_checked_before_queueing(tmp_path, monkeypatch):
    from tools.sweep import run_sweep
    from tools.tune import load_spec

    monkeypatch.chdir(ROOT)
    for spec in sorted((ROOT / "sweeps").glob("*-tune.yaml")):
        load_spec(str(spec))  # the committed ones pass
    tune = tmp_path / "tune.yaml"
    tune.write_text(
        "task: tabular\nmetric: val_acc\nspace:\n  tabular.train.lrr: {low: 0.001, high: 0.1}\n"
    )
    with pytest.raises(StageError, match=r"tabular.train.lrr: unknown key \(did you mean"):
        load_spec(str(tune))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("task: tabular\ngrid:\n  tabular.train.dropout: [0.1, 1.5]\n")
    with pytest.raises(StageError, match=r"^params.yaml: tabular.train.dropout: input should be"):
        run_sweep(str(sweep))  # fails before a single experiment is queued
