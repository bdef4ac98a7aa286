"""Issue 11: every DVC stage depends on all the project code it can import, and DVC sees an edit to it.

A stage runs `python -m stages STAGE TASK`; the dispatcher imports stages/<task>/<stage>.py,
which imports the rest. If an imported file lay outside the stage's deps, editing it would
leave the stage "up to date" with stale outputs. Imports are lazy (inside functions) in
places, so we walk every import statement in each file's AST, not just the top level.
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

import pytest
from conftest import ROOT, copy_repo, run
from dvc.repo import Repo

PROJECT = (
    "stages",
    "app",
    "tools",
)  # top-level packages that are ours; everything else is a library


def module_file(root: Path, name: str) -> Path | None:
    """The file of project module `name` (a package is its __init__.py); None if not one."""
    if name.split(".")[0] not in PROJECT:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports(root: Path, path: Path) -> set[str]:
    """Project modules one file imports, anywhere in it, parent packages included."""
    names = set()
    package = path.relative_to(root).parent.parts  # what `from . import x` is relative to
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            names.add(base)
            # `from stages.detect import yolo` imports the module stages/detect/yolo.py; a
            # name that is not a module (`from stages.core.cli import log`) has no file.
            names |= {
                f"{base}.{alias.name}"
                for alias in node.names
                if module_file(root, f"{base}.{alias.name}")
            }
    found = set()
    for name in names:
        if name.split(".")[0] not in PROJECT:
            continue
        assert module_file(root, name), (
            f"{path.relative_to(root)} imports {name}, which has no file"
        )
        parts = name.split(".")
        found |= {
            ".".join(parts[:i]) for i in range(1, len(parts) + 1)
        }  # importing a.b.c runs a and a.b too
    return found


def closure(root: Path, entries: list[str]) -> dict[Path, list[str]]:
    """Every project file the entry modules reach by imports -> the import chain reaching it."""
    chains = {module_file(root, name): [name] for name in entries}
    todo = list(chains)
    while todo:
        path = todo.pop()
        for name in imports(root, path):
            dep = module_file(root, name)
            if dep not in chains:
                chains[dep] = [*chains[path], name]
                todo.append(dep)
    return chains


def stage_code(root: Path) -> dict[str, tuple[list[Path], dict[Path, list[str]], set[Path]]]:
    """Each stage (foreach expanded by DVC itself) -> (its deps, its import closure, the
    files in that closure that .dvcignore hides: DVC hashes no such file, so no dep covers it)."""
    out = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            argv = shlex.split(stage.cmd)
            assert argv[:3] == ["python", "-m", "stages"] and len(argv) == 5, (
                f"{stage.name}: expected `python -m stages STAGE TASK`, got {stage.cmd!r}"
            )
            name, task = argv[3:]
            # The dispatcher imports stages.<task>.<stage> by name, which no AST walk can see.
            dispatched = f"stages.{task}.{name}"
            assert module_file(root, dispatched), f"{stage.name}: {dispatched} does not exist"
            code = closure(root, ["stages", "stages.__main__", dispatched])
            hidden = {path for path in code if repo.dvcignore.is_ignored(repo.fs, str(path))}
            out[stage.name] = ([Path(dep.fs_path) for dep in stage.deps], code, hidden)
    return out


def covering(deps: list[Path], path: Path) -> Path | None:
    """The dep that covers path: path itself or a folder above it."""
    return next((dep for dep in deps if dep == path or dep in path.parents), None)


def test_the_walker_finds_lazy_and_submodule_imports(tmp_path):
    pkg = tmp_path / "stages"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "sub/lazy.py", "sub/leaf.py", "plain.py"):
        (pkg / name).write_text("")
    (pkg / "main.py").write_text(
        "import os\nfrom stages.plain import x\ndef f():\n    from stages.sub import lazy\n"
    )
    (pkg / "sub/lazy.py").write_text("from .leaf import y\n")

    def rel(paths):
        return sorted(str(p.relative_to(tmp_path)) for p in paths)

    assert rel(closure(tmp_path, ["stages.main"])) == [
        "stages/__init__.py",
        "stages/main.py",
        "stages/plain.py",
        "stages/sub/__init__.py",
        "stages/sub/lazy.py",
        "stages/sub/leaf.py",
    ]
    # And on the real code: train@detect reaches yolo only through a module-level
    # `from stages.detect import yolo`, boxformats reaches it only inside a function.
    train = closure(ROOT, ["stages.detect.train"])
    assert ROOT / "stages/detect/yolo.py" in train and ROOT / "stages/core/files.py" in train
    assert ROOT / "stages/detect/yolo.py" in closure(ROOT, ["stages.detect.boxformats"])


def test_every_stage_depends_on_the_code_it_imports():
    problems = []
    for name, (deps, code, hidden) in stage_code(ROOT).items():
        for path, chain in sorted(code.items()):
            why = (
                "is not under its deps"
                if not covering(deps, path)
                else "is hidden by .dvcignore"
                if path in hidden
                else None
            )
            if why:
                problems.append(
                    f"{name}: {path.relative_to(ROOT)} {why} (imported via {' -> '.join(chain)})"
                )
    assert not problems, "\n".join(problems)


def modified_deps(repo: Path) -> dict[str, set[str]]:
    """`dvc status --json`: {stage: [{"changed deps": {path: state}}, {"changed outs": ...},
    "changed command", ...]} -> {stage: the deps whose state is "modified"}."""
    status = json.loads(run(repo, "dvc", "status", "--json").stdout)
    out = {}
    for stage, entries in status.items():
        assert isinstance(entries, list) and all(
            isinstance(e, str) or isinstance(e, dict) and set(e) <= {"changed deps", "changed outs"}
            for e in entries
        ), (stage, entries)
        changed = [
            e["changed deps"] for e in entries if isinstance(e, dict) and "changed deps" in e
        ]
        out[stage] = {dep for deps in changed for dep, state in deps.items() if state == "modified"}
    return out


@pytest.mark.slow
def test_editing_a_core_module_marks_its_stages_changed(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    # The committed dvc.lock may be stale (after a refactor it is), and then every code dep
    # already reads "modified": an edit could not be seen to change anything. So first record
    # today's code in the copy's lock, as `dvc commit --force` would if the copy had outputs
    # (it has none, and `Repo.commit(allow_missing=True)` still fails in the run cache).
    run(
        repo,
        "python",
        "-c",
        "from dvc.repo import Repo\n"
        "stages = Repo().index.stages\n"
        "for s in stages: s.save(allow_missing=True, run_cache=False)\n"
        "stages[0].dvcfile.dump_stages(stages, update_pipeline=False)",
    )
    stages = stage_code(repo)
    before = modified_deps(repo)
    assert not any(any(dep.startswith("stages/") for dep in deps) for deps in before.values()), (
        before
    )
    modules = sorted((repo / "stages/core").glob("*.py"))
    assert modules
    for module in modules:
        # Each stage that imports the module must report the dep covering it (stages/core) as
        # modified; with no covering dep (test 1 fails then) the module itself, which never shows.
        users = {
            name: covering(deps, module) or module
            for name, (deps, code, _) in stages.items()
            if module in code
        }
        text = module.read_text()
        module.write_text(text + "\n# edited by tests/test_deps.py\n")
        try:
            after = modified_deps(repo)
        finally:
            module.write_text(text)
        missed = {
            name: str(dep.relative_to(repo))
            for name, dep in users.items()
            if str(dep.relative_to(repo)) not in after.get(name, set())
        }
        assert not missed, (
            f"editing {module.relative_to(repo)} left these stages up to date: {missed}"
        )
