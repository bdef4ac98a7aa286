"""Object detection: bad labels, images and datasets through the real stage CLI (one line,
naming the file and line).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import detect_helpers
import pytest
from conftest import set_params, stage

# HOME for every subprocess of this module (detect_helpers.fake_home).
fake_home = pytest.fixture(scope="module", autouse=True)(detect_helpers.fake_home)


# --- bad inputs through the real stage CLI -------------------------------------------------------


def one_line_error(res, *patterns: str) -> str:
    err = res.stderr
    assert res.returncode == 1, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{err}"
    assert (
        "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    ), err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
    return err


def _wrong_fields(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("1 0.5 0.5 0.2\n")


def _class_out_of_range(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("3 0.5 0.5 0.2 0.2\n")


def _outside(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("0 1.25 0.5 0.2 0.2\n")


def _zero_width(root):
    with open(root / "labels/002.txt", "a") as f:
        f.write("0 0.5 0.5 0 0.2\n")


def _not_an_image(root):
    (root / "images/004.png").write_text("not a png\n")


def _label_without_image(root):
    (root / "labels/zzz.txt").write_text("0 0.5 0.5 0.2 0.2\n")


def line_after(root: Path) -> int:
    return len((root / "labels/002.txt").read_text().splitlines())


# id: (break the dataset, failing (table, expectation, column), expected sample value, row label)
VALIDATE_CASES = {
    "wrong_fields": (
        _wrong_fields,
        {
            ("boxes/all", "expect_column_values_to_be_in_set", "fields"),
            ("boxes/all", "expect_column_values_to_not_be_null", "class_name"),
        },
        "4",
        "002:{n}",
    ),
    "class_out_of_range": (
        _class_out_of_range,
        {
            ("boxes/all", "expect_column_values_to_be_between", "cls"),
            ("boxes/all", "expect_column_values_to_not_be_null", "class_name"),
        },
        "3.0",
        "002:{n}",
    ),
    "coordinate_outside": (
        _outside,
        {("boxes/all", "expect_column_values_to_be_between", "x")},
        "1.25",
        "002:{n}",
    ),
    "zero_width": (
        _zero_width,
        {("boxes/all", "expect_column_values_to_be_between", "w")},
        "0.0",
        "002:{n}",
    ),
    "not_an_image": (
        _not_an_image,
        {("images/all", "expect_column_values_to_be_null", "error")},
        "\"UnidentifiedImageError: cannot identify image file 'data/bad/images/004.png'\"",
        "004",
    ),
    "label_without_image": (
        _label_without_image,
        {("images/all", "expect_column_values_to_be_in_set", "has_image")},
        "False",
        "(label) data/bad/labels/zzz.txt",
    ),
}


@pytest.mark.parametrize("case", VALIDATE_CASES)
def test_validate_names_the_bad_label_or_image(repo: Path, case: str):
    """Broken labels and images are recorded by prepare and stop the pipeline at validate,
    which names the expectation, the column, the value and the image (and label line)."""
    make, failing, value, row = VALIDATE_CASES[case]
    root = repo / "data/bad"
    detect_helpers.write_shapes(root, 6)
    make(root)
    row = row.format(n=line_after(root))
    set_params(repo, {"detect.data.source": "data/bad"})
    stage(repo, "prepare", "detect")
    res = stage(repo, "validate", "detect", check=False)
    err = res.stderr
    assert res.returncode == 1 and "Traceback" not in err, err
    # The first run on a source creates its suites (one line saying so), then checks them.
    assert err.startswith(
        "created data/expectations/detect/bad.images.json and "
        "data/expectations/detect/bad.boxes.json from params.yaml detect.validate"
    ), err
    err = err.split("\n", 1)[1]
    assert err.startswith(
        "error: data does not meet the expectations in data/expectations/detect/bad.images.json "
        "and data/expectations/detect/bad.boxes.json\n"
    ), err
    assert len(err.splitlines()) == 3 + len(failing), (
        err
    )  # the error, the table, each expectation, what to do
    table, expectation, column = sorted(failing)[0]
    assert re.search(
        rf"{re.escape(table)} \(data/bad (images \(rows: image\)|labels \(rows: image:line\))\)",
        err,
    ), err
    assert re.search(
        rf"- {expectation} on column {column!r} .*: 1 unexpected, e\.g\. {re.escape(value)}.* "
        rf"\(row {re.escape(row)}\)",
        err,
    ), err
    report = detect_helpers.read_json(repo / "metrics/detect/validation.json")
    assert report["success"] is False
    got = {
        (name, r["expectation"], r["column"])
        for name, t in report["tables"].items()
        for r in t["results"]
        if not r["success"]
    }
    assert got == failing
    assert all(
        row in r.get("sample_rows", [row])
        for t in report["tables"].values()
        for r in t["results"]
        if not r["success"]
    )


def test_validate_control_passes(repo: Path):
    """The control for the cases above: the untouched dataset validates."""
    detect_helpers.write_shapes(repo / "data/bad", 6)
    set_params(repo, {"detect.data.source": "data/bad"})
    stage(repo, "prepare", "detect")
    stage(repo, "validate", "detect")
    assert detect_helpers.read_json(repo / "metrics/detect/validation.json")["success"] is True


def _empty(repo):
    root = repo / "data/empty"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names: [a, b]\n")
    return {"detect.data.source": "data/empty"}, [r"^error: data/empty: the dataset has no images$"]


def _coco_missing_images(repo):
    detect_helpers.write_images(repo / "data/coco/images")
    (repo / "data/coco/images/b.png").unlink()
    coco = {
        **detect_helpers.COCO,
        "images": detect_helpers.COCO["images"]
        + [{"id": 40, "file_name": "gone.png", "width": 8, "height": 8}],
    }
    (repo / "data/coco/instances.json").write_text(json.dumps(coco))
    return (
        {"detect.data.source": "data/coco/instances.json", "detect.data.format": "coco"},
        [
            r"^error: data/coco/instances\.json: 2 of 4 images are not in data/coco/images, "
            r"e\.g\. b\.png, gone\.png$"
        ],
    )


def _voc_malformed(repo):
    root = detect_helpers.write_voc(repo / "data/voc")
    (root / "Annotations/b.xml").write_text(
        detect_helpers.voc_xml("b", detect_helpers.VOC_XML["b"]).replace("</annotation>", "")
    )
    return (
        {"detect.data.source": "data/voc", "detect.data.format": "voc"},
        [r"^error: data/voc/Annotations/b\.xml: malformed VOC annotation \(ParseError: .*line 1"],
    )


def _voc_no_size(repo):
    root = detect_helpers.write_voc(repo / "data/voc")
    (root / "Annotations/a.xml").write_text(
        re.sub(r"<size>.*</size>", "", detect_helpers.voc_xml("a", detect_helpers.VOC_XML["a"]))
    )
    return (
        {"detect.data.source": "data/voc", "detect.data.format": "voc"},
        [r"^error: data/voc/Annotations/a\.xml: malformed VOC annotation \(TypeError"],
    )


def _unknown_format(repo):
    detect_helpers.write_shapes(repo / "data/tiny", 3)
    return (
        {"detect.data.source": "data/tiny", "detect.data.format": "kitti"},
        [
            r"^error: params\.yaml: detect\.data\.format: input should be 'yolo', 'coco' or 'voc' \(it is 'kitti'\)$"
        ],
    )


def _no_names(repo):
    detect_helpers.write_shapes(repo / "data/tiny", 3)
    (repo / "data/tiny/data.yaml").unlink()
    return {"detect.data.source": "data/tiny"}, [r"^error: data/tiny: no class names"]


PREPARE_CASES = {
    "empty_dataset": _empty,
    "coco_missing_images": _coco_missing_images,
    "voc_malformed": _voc_malformed,
    "voc_without_size": _voc_no_size,
    "unknown_format": _unknown_format,
    "no_class_names": _no_names,
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare_rejects_bad_dataset(repo: Path, case: str):
    params, patterns = PREPARE_CASES[case](repo)
    set_params(repo, params)
    one_line_error(stage(repo, "prepare", "detect", check=False), *patterns)
    assert not (repo / "data/prepared/detect").exists()  # nothing half-written
