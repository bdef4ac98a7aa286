"""One place for each path: dvc.yaml's stage deps and outs are exactly what
stages/core/layout.py gives (or a params.yaml key, or code), and no other module under
stages/ spells a path that dvc.yaml names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml
from conftest import ROOT
from dvc.repo import Repo

from stages.core import layout
from stages.core.params import TASKS, load_params
from stages.core.schema import Params

CODE = {"stages/__init__.py", "stages/__main__.py", "stages/core", "params.yaml"}  # and params


def expected(stage: str, task: str, params: Params) -> tuple[set, set]:
    """(deps, outs) of stage@task, from the layout and params.yaml, code deps aside."""
    source = getattr(params, task).data.source
    prepared, model, valid = layout.prepared(task), layout.model_pt(task), layout.validation(task)
    # tabular's served model is the network and boost's members (the others: the network)
    served = {model, *((layout.boosting(task), layout.ensemble(task)) if task == "tabular" else ())}
    io = {
        "demo": (set(), {layout.DEMO.get(task)}),
        "prepare": ({source}, {prepared}),
        "validate": ({prepared, layout.expectations(task)}, {valid}),
        "train": ({prepared, source, valid}, {model, layout.train_log(task)}),
        "boost": ({model, prepared, source}, {layout.boosting(task), layout.ensemble(task)}),
        "evaluate": ({*served, prepared, source}, {layout.metrics(task), layout.plots(task)}),
        "labels": (
            {prepared, source, valid, *({layout.ensemble(task)} if task == "tabular" else ())},
            {layout.label_issues(task), layout.label_issue_counts(task)},
        ),
        "export": (
            {*served, prepared, source, layout.metrics(task), valid},
            {layout.model_onnx(task), layout.card(task)},
        ),
        "infer": (
            {
                layout.model_onnx(task),
                layout.card(task),
                layout.expectations(task),
                getattr(params, task).infer.source,
            },
            {
                layout.PREDICTIONS.get(task) or getattr(params, task).infer.output,
                layout.infer_stats(task),
            },
        ),
    }[stage]
    return tuple({str(p) for p in paths} for paths in io)


def test_dvc_yaml_names_the_layouts_paths():
    params = load_params(ROOT / "params.yaml")
    seen = 0
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            name, task = stage.name.split("@")
            deps = {d.def_path for d in stage.deps} - CODE - {f"stages/{task}"}
            outs = {o.def_path for o in stage.outs}
            assert (deps, outs) == expected(name, task, params), stage.name
            seen += 1
    # demo@image, demo@detect, six stages per task, labels@ for the classifiers, boost@tabular
    assert seen == 2 + 6 * len(TASKS) + 2 + 1


def dvc_paths() -> set[str]:
    """Every path dvc.yaml names for a stage, the artifacts, metrics and plots, expanded per
    task, and the folders they share (data/prepared, models, metrics, ...)."""
    text = (ROOT / "dvc.yaml").read_text()
    found = set()
    for task in TASKS:
        expanded = text.replace("${key}", task).replace("${item}", task)
        for word in expanded.split():
            word = word.strip("-:'\",{}")
            if word.startswith(("data/", "models/", "metrics/")) and "$" not in word:
                found.add(word)
    return found


def literals(path: Path):
    """(line, text) of each string literal in a module, docstrings aside; of an f-string its
    leading text (f"metrics/{task}/..." → "metrics/")."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield node.lineno, node.value


def spells_a_dvc_path(text: str, named: set[str], folders: set[str]) -> bool:
    return any(text == p or text.startswith(p + "/") for p in named) or text in folders


def test_no_module_under_stages_spells_a_dvc_yaml_path():
    named = dvc_paths()
    # The folders they share, as a literal or the start of an f-string ("models/{task}").
    folders = {"data/prepared", "data/expectations", "data/predictions", "data/demo"}
    folders |= {f + "/" for f in folders} | {"models/", "metrics/"}
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in sorted((ROOT / "stages").rglob("*.py"))
        if path.name != "layout.py" or path.parent.name != "core"
        for line, text in sorted(set(literals(path)))  # an f-string's text is walked twice
        if spells_a_dvc_path(text, named, folders)
    ]
    assert found == [], "use stages/core/layout.py:\n" + "\n".join(found)


def test_the_check_sees_a_path_literal():
    named = dvc_paths()
    assert {"data/prepared/tabular", "models/detect/model.onnx", "metrics/image/train"} <= named
    folders = {"models/", "metrics/"}
    for text in ("data/prepared/tabular", "data/prepared/tabular/train.parquet", "metrics/"):
        assert spells_a_dvc_path(text, named, folders), text
    # Ultralytics' metric names and prose are no paths of ours.
    for text in ("metrics/mAP50(B)", "models", "the data/prepared/tabular folder"):
        assert not spells_a_dvc_path(text, named, folders), text


def test_params_yaml_paths_are_not_layout_paths_in_disguise():
    """Paths that params.yaml names are read from params, never from the layout."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["tabular"]["infer"]["output"] not in {str(p) for p in layout.PREDICTIONS.values()}


def file_names() -> set[str]:
    """The layout's file names: its *_FILE constants and the names its fixed paths end in."""
    names = {v for k, v in vars(layout).items() if k.endswith("_FILE")}
    fixed = [layout.COST, *layout.PREDICTIONS.values()]
    return names | {p.name for p in fixed}


def strings(path: Path):
    """(line, text) of each string literal in a module, docstrings aside, and of every piece
    of text in an f-string (f"{out}/model.json" → "/model.json")."""
    tree = ast.parse(path.read_text(), str(path))
    yield from literals(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for part in node.values:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield node.lineno, part.value


def spells_a_file_name(text: str, names: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w.-])", text) for n in names)


def test_no_module_spells_a_layout_file_name():
    """model.json, metrics.json, ... are spelled in stages/core/layout.py only: a file name
    written anywhere else under stages/, app/ or tools/ fails here."""
    names = file_names()
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for folder in ("stages", "app", "tools")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "stages/core/layout.py"
        for line, text in sorted(set(strings(path)))
        if spells_a_file_name(text, names)
    ]
    assert found == [], "use stages/core/layout.py's names:\n" + "\n".join(found)


def test_the_check_sees_a_file_name():
    names = file_names()
    assert {"model.onnx", "model.json", "columns.json", "label_issues.csv", "cost.json"} <= names
    for text in ("model.json", "/metrics.json", "see metrics/detect/infer.json)", "model.pt"):
        assert spells_a_file_name(text, names), text
    for text in ("weights/last.pt", "my_model.json", "model.json5", "metrics.jsonl"):
        assert not spells_a_file_name(text, names), text
