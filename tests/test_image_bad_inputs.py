"""Image classification: bad input at prepare / validate, through the real stage CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_repo, set_params, stage
from image_helpers import (
    TINY_IMAGE,
    bomb_png,
    one_line_error,
    pattern,
    read_json,
    truncated_png,
    write_image_folder,
)
from PIL import Image

from stages.core.images import list_images

# --- bad input at prepare / validate, through the stage CLI -------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A repo copy with tiny image params and no image outputs yet."""
    repo = copy_repo(tmp_path / "repo")
    set_params(repo, TINY_IMAGE)
    return repo


def use_source(repo: Path, source: str, **params) -> None:
    set_params(repo, {"image.data.source": source, **params})


def _empty_class(root: Path) -> str:
    write_image_folder(root, classes=("checker", "square"), per_class=8)
    (root / "vstripes").mkdir()
    (root / "vstripes" / "notes.txt").write_text("no pictures in here")
    return f"{root.name}/vstripes: class folder 'vstripes' has no images"


def _one_class(root: Path) -> str:
    write_image_folder(root, classes=("checker",), per_class=8)
    return rf"{root.name}: one class \('checker'\); classification needs at least two"


def _manifest_missing_file(root: Path) -> str:
    write_image_folder(root / "pics", classes=("checker", "square"), per_class=8)
    table, _ = list_images(root / "pics")
    rows = [
        f"pics/{p},{label}" for p, label in zip(table["path"], table["label"], strict=False)
    ] + ["pics/gone.png,square"]
    (root / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return rf"{root.name}/labels\.csv: 1 listed files do not exist, e\.g\. pics/gone\.png$"


def _manifest_without_label(root: Path) -> str:
    write_image_folder(root / "pics", classes=("checker", "square"), per_class=8)
    table, _ = list_images(root / "pics")
    (root / "labels.csv").write_text(
        "path,class\n"
        + "".join(f"pics/{p},{c}\n" for p, c in zip(table["path"], table["label"], strict=False))
    )
    return rf"{root.name}/labels\.csv: manifest needs columns path,label; missing: label$"


# case: (make the data under root, returning the expected message; source relative to root)
PREPARE_CASES = {
    "empty_class": (_empty_class, ""),
    "one_class": (_one_class, ""),
    "manifest_missing_file": (_manifest_missing_file, "labels.csv"),
    "manifest_without_label": (_manifest_without_label, "labels.csv"),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare_rejects_bad_datasets(fresh: Path, case: str):
    make, source = PREPARE_CASES[case]
    root = fresh / "data/images" / case
    message = make(root)
    source = f"data/images/{case}" + (f"/{source}" if source else "")
    use_source(fresh, source)
    err = one_line_error(
        stage(fresh, "prepare", "image", check=False), rf"^error: data/images/{message}"
    )
    assert len(err.splitlines()) == 1, err
    assert not (fresh / "data/prepared/image").exists()


def test_prepare_reads_a_manifest_anywhere(fresh: Path):
    """Paths in the manifest are relative to it; the split manifests prepare writes are
    relative to themselves, and both name the same files."""
    root = fresh / "data/images/listed"
    write_image_folder(root / "pics", classes=("checker", "square", "vstripes"), per_class=8)
    table, _ = list_images(root / "pics")
    (root / "lists").mkdir()
    (root / "lists/all.csv").write_text(
        "label,path\n"
        + "".join(f"{c},../pics/{p}\n" for p, c in zip(table["path"], table["label"], strict=False))
    )
    use_source(fresh, "data/images/listed/lists/all.csv")
    stage(fresh, "prepare", "image")
    stage(fresh, "validate", "image")
    prepared = fresh / "data/prepared/image"
    schema = read_json(prepared / "columns.json")
    assert schema["root"] == "data/images/listed/lists" and schema["classes"] == [
        "checker",
        "square",
        "vstripes",
    ]
    index = pd.read_parquet(prepared / "index.parquet")
    assert sorted(index.index) == sorted(f"../pics/{p}" for p in table["path"])
    for name in ("train", "val", "test"):
        split = pd.read_csv(prepared / f"{name}.csv")
        assert len(split) == (index["split"] == name).sum() > 0
        for rel, label in zip(split["path"], split["label"], strict=False):
            assert (prepared / rel).resolve().relative_to((root / "pics").resolve()).parts[
                0
            ] == label


def test_unreadable_files_are_indexed_then_fail_validation(fresh: Path):
    root = fresh / "data/images/broken"
    write_image_folder(root, classes=("checker", "square", "vstripes"), per_class=8)
    truncated_png(root / "checker/trunc.png")
    (root / "checker/zero.png").write_bytes(b"")
    (root / "square/fake.jpg").write_text("<html>not a jpeg</html>\n")
    bomb_png(root / "vstripes/bomb.png")
    use_source(fresh, "data/images/broken")
    stage(fresh, "prepare", "image")  # records each file's error; that is validate's to judge

    index = pd.read_parquet(fresh / "data/prepared/image/index.parquet")
    assert len(index) == 3 * 8 + 4
    errors = index["error"].dropna().to_dict()
    assert set(errors) == {
        "checker/trunc.png",
        "checker/zero.png",
        "square/fake.jpg",
        "vstripes/bomb.png",
    }
    assert errors["checker/trunc.png"].startswith("OSError: image file is truncated")
    assert errors["checker/zero.png"] == "empty file (0 bytes)"
    assert errors["square/fake.jpg"].startswith(
        "UnidentifiedImageError: cannot identify image file"
    )
    assert errors["vstripes/bomb.png"].startswith(
        "decompression bomb: Image size (100000000 pixels) exceeds limit"
    )

    err = one_line_error(
        stage(fresh, "validate", "image", check=False),
        r"^error: data does not meet the expectations in data/expectations/image/broken\.json",
        r"expect_column_values_to_be_null on column 'error'",
    )
    for path in errors:
        assert re.search(rf"\(row {re.escape(path)}\)", err), f"{path} not in:\n{err}"
    report = read_json(fresh / "metrics/image/validation.json")
    assert report["success"] is False
    failed = {
        (r["column"], row)
        for t in report["tables"].values()
        for r in t["results"]
        if not r["success"]
        for row in r.get("sample_rows", [])
    }
    assert {row for column, row in failed if column == "error"} == set(errors)


def test_validate_checks_mode_size_and_images_per_class(fresh: Path):
    root = fresh / "data/images/odd"
    write_image_folder(root, classes=("checker", "square"), per_class=10)
    write_image_folder(root, classes=("vstripes",), per_class=6)  # below min_per_class 8
    Image.fromarray(pattern("checker", 16, 16, 1)).convert("CMYK").save(root / "checker/cmyk.jpg")
    Image.fromarray(pattern("square", 5, 7, 2)).save(root / "square/tiny.png")  # below min_size 8
    use_source(fresh, "data/images/odd", **{"image.validate.min_per_class": 8})
    stage(fresh, "prepare", "image")
    one_line_error(
        stage(fresh, "validate", "image", check=False),
        r"^error: data does not meet the expectations in data/expectations/image/odd\.json",
    )
    report = read_json(fresh / "metrics/image/validation.json")
    failed: dict[str, set] = {}
    for table in report["tables"].values():
        for r in table["results"]:
            if not r["success"]:
                failed.setdefault(r["column"], set()).update(r["sample_rows"])
    assert set(failed) == {"mode", "width", "height", "class_count"}, failed
    assert failed["mode"] == {"checker/cmyk.jpg"}
    assert failed["width"] == failed["height"] == {"square/tiny.png"}
    assert failed["class_count"] and all(
        row.startswith("vstripes/") for row in failed["class_count"]
    )


def test_cross_split_duplicates_fail_or_are_dropped(fresh: Path):
    root = fresh / "data/images/dups"
    write_image_folder(root, classes=("checker", "square", "vstripes"), per_class=8)
    original = sorted((root / "square").glob("*.png"))[0]
    copies = [f"square/copy{i}.png" for i in range(6)]
    for c in copies:
        (root / c).write_bytes(original.read_bytes())
    same = {original.relative_to(root).as_posix(), *copies}
    use_source(fresh, "data/images/dups")

    stage(fresh, "prepare", "image")
    index = pd.read_parquet(fresh / "data/prepared/image/index.parquet")
    assert index.loc[sorted(same), "split"].nunique() > 1  # the copies did land in several splits
    assert set(index.index[index["dup_across_splits"]]) == same
    err = one_line_error(
        stage(fresh, "validate", "image", check=False),
        r"expect_column_values_to_be_in_set on column 'dup_across_splits'",
    )
    assert any(re.search(rf"\(row {re.escape(p)}\)", err) for p in same), err

    set_params(fresh, {"image.data.duplicates": "drop"})
    res = stage(fresh, "prepare", "image")
    first = min(index.loc[sorted(same), "split"], key=["train", "val", "test"].index)
    later = {p for p in same if index.loc[p, "split"] != first}
    assert (
        f"warning: dropped {len(later)} images whose identical copy is in an earlier split"
        in res.stderr
    )
    stage(fresh, "validate", "image")
    dropped = pd.read_parquet(fresh / "data/prepared/image/index.parquet")
    assert set(dropped.index) == set(index.index) - later
    assert (dropped.groupby("sha256")["split"].nunique() == 1).all() and not dropped[
        "dup_across_splits"
    ].any()
    listed = pd.concat(
        pd.read_csv(fresh / f"data/prepared/image/{s}.csv") for s in ("train", "val", "test")
    )
    assert len(listed) == len(dropped) and not any(p.endswith(tuple(later)) for p in listed["path"])
