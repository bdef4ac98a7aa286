"""Issue 31: the labels stage finds flipped labels, on penguins (tabular) and digits (image).

5% of the labels are flipped to another class at random (seed FLIP_SEED); the list must hold
at least 60% of the flipped rows, at least half of the list being flipped rows. Without
flips the list must be short. Both stages run in process, on the default `labels` params
(digits at 16 px: the 8×8 originals lose nothing, and the folds cost a quarter of 32 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, card_of, params_with

from app.label_issues import image_items, show, tabular_rows
from stages.core.cli import StageError
from stages.core.schema import replaced
from stages.image import demo
from stages.image import labels as image_labels
from stages.image import prepare as image_prepare
from stages.tabular import labels as tabular_labels
from stages.tabular import prepare as tabular_prepare
from tools.report import label_issues_md

FLIP_SEED = 31
SHARE = 0.05


def flip(labels: pd.Series, share: float, seed: int) -> tuple[pd.Series, np.ndarray]:
    """The labels with `share` of them (rows drawn at random) changed to another class."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(labels), round(share * len(labels)), replace=False)
    classes = sorted(labels.unique())
    out = labels.copy()
    for r in rows:
        out.iloc[r] = rng.choice([c for c in classes if c != labels.iloc[r]])
    return out, rows


def scores(listed: pd.Series, flipped: set) -> tuple[float, float]:
    hit = len(set(listed) & flipped)
    return hit / max(len(flipped), 1), hit / max(len(listed), 1)


def tabular_issues(tmp_path: Path, share: float) -> tuple[pd.DataFrame, set, dict]:
    df = pd.read_csv(ROOT / "data/tabular/penguins.csv")
    df["species"], rows = flip(df["species"], share, FLIP_SEED)
    csv = tmp_path / "penguins.csv"
    df.to_csv(csv, index=False)
    params = params_with({"tabular.data.source": str(csv)})
    tabular_prepare.run(params, out_dir=str(tmp_path / "prepared"))
    summary = tabular_labels.run(
        params, tmp_path / "prepared", tmp_path / "metrics/tabular/label_issues.csv"
    )
    issues = pd.read_csv(tmp_path / "metrics/tabular/label_issues.csv")
    return issues, set((rows + 2).tolist()), summary  # row i of the frame is CSV line i + 2


@pytest.mark.slow
def test_tabular_finds_flipped_penguins(tmp_path, monkeypatch):
    issues, flipped, summary = tabular_issues(tmp_path, SHARE)
    recall, precision = scores(issues["line"], flipped)
    print(
        f"penguins, {len(flipped)} flipped: {len(issues)} listed, recall {recall:.2f}, precision {precision:.2f}"
    )
    assert recall >= 0.6 and precision >= 0.5, issues
    assert list(issues.columns) == ["line", "given", "suggested", "score"]
    assert issues["score"].is_monotonic_increasing  # worst first
    assert (issues["given"] != issues["suggested"]).all()
    assert summary["count"] == len(issues) and summary["rows"] == 344

    # `line` is the CSV's file line: the app shows that line, whose label is the given one.
    shown = tabular_rows(issues, tmp_path / "penguins.csv")
    assert (shown["species"] == shown["given"]).all() and len(shown) == len(issues)
    import gradio as gr

    with gr.Blocks() as ui:  # the Models tab's section: a heading and the rows
        show(
            gr,
            "tabular",
            card_of(data={"source": str(tmp_path / "penguins.csv"), "rows": {"train": 344}}),
            tmp_path / "metrics",
        )
    kinds = [type(b).__name__ for b in ui.blocks.values()]
    assert kinds == ["Markdown", "Dataframe"], kinds
    monkeypatch.chdir(tmp_path)
    md = label_issues_md("tabular", top=3)
    assert f"{len(issues)} of 344 rows" in md and str(issues["line"].iloc[0]) in md


@pytest.mark.slow
def test_tabular_clean_list_is_short(tmp_path):
    issues, _, _ = tabular_issues(tmp_path, 0.0)
    print(f"penguins, no flips: {len(issues)} listed")
    assert len(issues) <= 3  # 1% of 344 rows


def digits_manifest(tmp_path: Path, share: float) -> tuple[dict, set]:
    params = params_with({"image.demo.size": 16, "image.data.image_size": 16})
    root = tmp_path / "digits"
    demo.run(params, out_dir=str(root))
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    table = pd.DataFrame(
        {"path": [f"digits/{f}" for f in files], "label": [f.split("/")[0] for f in files]}
    )
    table["label"], rows = flip(table["label"], share, FLIP_SEED)
    table.to_csv(tmp_path / "manifest.csv", index=False)
    params = replaced(params, {"image.data.source": str(tmp_path / "manifest.csv")})
    return params, set(table["path"].iloc[rows])


@pytest.mark.slow
def test_image_finds_flipped_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the decoded-image cache (.cache/) goes here
    params, flipped = digits_manifest(tmp_path, SHARE)
    image_prepare.run(params, out_dir="prepared")
    summary = image_labels.run(params, Path("prepared"), Path("metrics/image/label_issues.csv"))
    issues = pd.read_csv("metrics/image/label_issues.csv")
    recall, precision = scores(issues["line"], flipped)
    print(
        f"digits, {len(flipped)} flipped: {len(issues)} listed, recall {recall:.2f}, precision {precision:.2f}"
    )
    assert recall >= 0.6 and precision >= 0.5, issues
    assert summary["count"] == len(issues) and summary["rows"] == 1797
    shown = image_items(issues.head(6), params.image.data.source)
    assert len(shown) == 6 and all(Path(f).is_file() for f, _ in shown)

    # Review → exclude → rerun: the listed paths leave every split.
    params = replaced(params, {"image.data.exclude": issues["line"].tolist()})
    schema = image_prepare.run(params, out_dir="prepared")
    assert sum(schema.rows.values()) == 1797 - len(issues)


def test_exclude_lines_leave_every_split(tmp_path):
    params = params_with({"tabular.data.source": str(ROOT / "data/tabular/penguins.csv")})
    before = tabular_prepare.run(params, out_dir=str(tmp_path / "a"))
    params = replaced(params, {"tabular.data.exclude_lines": [2, 3, 345]})
    after = tabular_prepare.run(params, out_dir=str(tmp_path / "b"))
    assert sum(after.rows.values()) == sum(before.rows.values()) - 3
    lines = pd.concat(
        [pd.read_parquet(tmp_path / f"b/{n}.parquet") for n in ("train", "val", "test")]
    ).index
    assert not {2, 3, 345} & set(lines)
    kept = {
        n: set(pd.read_parquet(tmp_path / f"a/{n}.parquet").index) - {2, 3, 345}
        for n in ("train", "test")
    }
    for n in kept:  # every other row keeps its split
        assert kept[n] == set(pd.read_parquet(tmp_path / f"b/{n}.parquet").index)
    params = replaced(params, {"tabular.data.exclude_lines": [346]})
    with pytest.raises(StageError, match="line 346 is not a data line"):
        tabular_prepare.run(params, out_dir=str(tmp_path / "c"))


def test_regression_is_skipped_with_an_empty_list(tmp_path):
    params = params_with(
        {
            "tabular.data.source": str(ROOT / "data/tabular/penguins.csv"),
            "tabular.data.target": "year",
            "tabular.data.task": "regression",
        }
    )
    tabular_prepare.run(params, out_dir=str(tmp_path / "prepared"))
    summary = tabular_labels.run(
        params, tmp_path / "prepared", tmp_path / "metrics/tabular/label_issues.csv"
    )
    assert summary["count"] == 0 and "regression" in summary["skipped"]
    issues = pd.read_csv(tmp_path / "metrics/tabular/label_issues.csv")
    assert list(issues.columns) == ["line", "given", "suggested", "score"] and issues.empty
