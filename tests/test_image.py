"""Image classification: `dvc repro` of the image chain on a tiny generated ImageFolder, and
torch-free inference over a folder with unreadable files in it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_repo, run, run_python, set_params
from image_helpers import (
    PATTERNS,
    TINY_IMAGE,
    bomb_png,
    pattern,
    read_json,
    truncated_png,
    write_image_folder,
)
from PIL import Image

from stages.image.data import preprocess

# --- dvc repro of the image chain ----------------------------------------------------

SOURCE = "data/images/shapes"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """A repo copy whose image source is a tiny generated ImageFolder, after one
    `dvc repro infer@image`. Returns the repo, repro's output and the mistakes sheet git had."""
    repo = copy_repo(tmp_path_factory.mktemp("image_pipeline") / "repo")
    write_image_folder(repo / SOURCE)
    set_params(repo, {"image.data.source": SOURCE, **TINY_IMAGE})
    committed = (
        repo / "metrics/image/plots/mistakes.png"
    ).read_bytes()  # the demo's, tracked by git
    out = run(repo, "dvc", "repro", "infer@image", timeout=300)
    return {
        "repo": repo,
        "stdout": out.stdout,
        "stderr": out.stderr,
        "committed_mistakes": committed,
    }


@pytest.mark.slow
def test_repro_runs_the_image_chain_only(pipeline):
    ran = re.findall(r"Running stage '([^']+)'", pipeline["stdout"])
    assert ran == [
        f"{s}@image" for s in ("prepare", "validate", "train", "evaluate", "export", "infer")
    ], ran
    # The demo digits are not an ancestor once image.data.source points elsewhere.
    assert not (pipeline["repo"] / "data/demo").exists()
    status = run(pipeline["repo"], "dvc", "status", "--with-deps", "infer@image").stdout
    assert "Data and pipelines are up to date" in status, status


@pytest.mark.slow
def test_repro_writes_every_output(pipeline):
    repo = pipeline["repo"]
    for rel in (
        "data/prepared/image/index.parquet",
        "data/prepared/image/columns.json",
        "data/prepared/image/test.csv",
        "data/expectations/image/shapes.json",
        "metrics/image/validation.json",
        "metrics/image/datadocs/index.html",
        "models/image/model.pt",
        "models/image/model.onnx",
        "models/image/model.json",
        "metrics/image/metrics.json",
        "metrics/image/plots/confusion.json",
        "metrics/image/plots/mistakes.png",
        "metrics/image/train/metrics.json",
        "data/predictions/image.csv",
        "metrics/image/infer.json",
    ):
        assert (repo / rel).is_file(), rel

    index = pd.read_parquet(repo / "data/prepared/image/index.parquet")
    assert (
        len(index) == 4 * 12
        and index["error"].isna().all()
        and not index["dup_across_splits"].any()
    )
    assert {"label", "width", "height", "mode", "bytes", "sha256", "split"} <= set(index.columns)
    assert set(index["mode"]) == {"RGB", "RGBA", "L", "P"}
    assert {(19, 23), (24, 20), (16, 16)} == set(zip(index["width"], index["height"], strict=False))
    assert index.index.str.contains("/more/").sum() == 4 * 4  # found in sub-folders
    assert (
        index.groupby("label")["split"].nunique() == 3
    ).all()  # stratified: every class in every split
    schema = read_json(repo / "data/prepared/image/columns.json")
    assert schema["classes"] == list(PATTERNS) and schema["image_size"] == 16

    validation = read_json(repo / "metrics/image/validation.json")
    assert (
        validation["success"] is True
        and "data/expectations/image/shapes.json" in validation["suite_file"]
    )
    assert {name: t["rows"] for name, t in validation["tables"].items()} == index[
        "split"
    ].value_counts().to_dict()

    metrics = read_json(repo / "metrics/image/metrics.json")["test"]
    n_test = int((index["split"] == "test").sum())
    assert set(metrics["per_class"]) == set(PATTERNS)
    assert sum(c["support"] for c in metrics["per_class"].values()) == n_test
    for c in metrics["per_class"].values():
        assert 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1
    # The mistakes sheet is this run's: 6 columns of 96 px, one 110 px row per 6 mistakes.
    mistakes = round(n_test * (1 - metrics["accuracy"]))
    sheet = repo / "metrics/image/plots/mistakes.png"
    assert sheet.read_bytes() != pipeline["committed_mistakes"]
    with Image.open(sheet) as im:
        im.load()
        assert im.format == "PNG" and im.size == (6 * 96, max(1, -(-min(mistakes, 24) // 6)) * 110)

    # DVCLive logged every epoch, and the tiny model did learn the training patterns.
    loss = pd.read_csv(repo / "metrics/image/train/plots/metrics/train_loss.tsv", sep="\t")
    assert len(loss) == 3 and loss["train_loss"].iloc[-1] < loss["train_loss"].iloc[0]

    card = read_json(repo / "models/image/model.json")
    assert card["parity"]["max_abs_diff"] <= 1e-3 and card["parity"]["class_agreement"] >= 0.995
    assert card["parity"]["rows"] == n_test
    assert card["classes"] == list(PATTERNS) and card["onnx"]["input_shape"] == ["batch", 3, 16, 16]
    assert card["preprocessing"]["image_size"] == 16 and card["validation"]["success"] is True
    assert card["data"]["source"] == SOURCE and card["params"]["image.train"]["epochs"] == 3
    # The ONNX file itself: a symbolic batch, fixed 3 × 16 × 16, any batch size runs.
    from stages.core.inference import open_session, run_batches

    session = open_session(repo / "models/image/model.onnx", threads=1)
    batch, *chw = session.get_inputs()[0].shape
    assert isinstance(batch, str) and chw == [3, 16, 16]
    x = preprocess([repo / SOURCE / p for p in index.index[:5]], card["preprocessing"])
    assert run_batches(session, x, 5).shape == (5, 4) and run_batches(session, x[:1], 1).shape == (
        1,
        4,
    )
    np.testing.assert_allclose(
        run_batches(session, x, 5)[:1], run_batches(session, x[:1], 1), atol=1e-5
    )

    preds = pd.read_csv(repo / "data/predictions/image.csv")
    trust = ["prediction_set", "ood_flagged", "ood_p_value"]  # stages/core/trust.py
    assert list(preds.columns) == ["path", "prediction", "probability", "top_k", "error", *trust]
    test_csv = pd.read_csv(repo / "data/prepared/image/test.csv")
    assert preds["path"].tolist() == test_csv["path"].tolist() and len(preds) == n_test
    # The manifest's paths are relative to the manifest and name the source's files.
    for rel, label in zip(test_csv["path"], test_csv["label"], strict=False):
        assert (repo / "data/prepared/image" / rel).resolve().parent.relative_to(
            (repo / SOURCE).resolve()
        ).parts[0] == label
    assert preds["error"].isna().all() and set(preds["prediction"]) <= set(PATTERNS)
    assert preds["probability"].between(0.25, 1).all()  # the top class of four
    assert [t.split()[0] for t in preds["top_k"]] == [
        f"{c}:{p:.3f}" for c, p in zip(preds["prediction"], preds["probability"], strict=False)
    ]
    assert all(len(t.split()) == 3 for t in preds["top_k"])  # image.infer.top_k
    # onnxruntime's predictions score exactly what torch scored in evaluate.
    assert (preds["prediction"] == test_csv["label"]).mean() == pytest.approx(metrics["accuracy"])
    stats = read_json(repo / "metrics/image/infer.json")
    assert stats == {"images": n_test, "failed": 0}  # timings: .cache/timings, not a tracked output
    assert read_json(repo / ".cache/timings/infer-image.json")["images_per_s"] > 0


# --- infer over a folder, torch-free -------------------------------------------------


@pytest.mark.slow
def test_infer_reports_unreadable_files_and_goes_on(pipeline, tmp_path: Path):
    import shutil

    repo = shutil.copytree(pipeline["repo"], tmp_path / "repo", symlinks=True)
    folder = tmp_path / "incoming"
    # Good images in sub-folders, in formats and modes the training data never had; an
    # opaque RGBA copy must predict as its RGB original, an LA copy as its L original.
    rgb = Image.fromarray(pattern("vstripes", 37, 23, seed=7))
    (folder / "sub/deeper").mkdir(parents=True)
    rgb.save(folder / "a.png")
    rgb.save(folder / "sub/deeper/d.bmp")
    rgb.convert("RGBA").save(folder / "sub/deeper/e.webp", lossless=True)
    rgb.convert("L").save(folder / "sub/g.png")
    rgb.convert("LA").save(folder / "f.png")
    rgb.convert("L").save(folder / "sub/b.JPG")
    rgb.convert("P").save(folder / "sub/c.gif")
    # Test images the pipeline already predicted: the same file gives the same answer.
    batch = pd.read_csv(repo / "data/predictions/image.csv").head(3)
    for i, rel in enumerate(batch["path"]):
        shutil.copy(repo / "data/prepared/image" / rel, folder / f"known{i}{Path(rel).suffix}")
    # Unreadable ones, and a file that is no image at all (no row).
    truncated_png(folder / "sub/trunc.png")
    (folder / "bad.jpg").write_text("this is text\n")
    (folder / "sub/zero.png").write_bytes(b"")
    bomb_png(folder / "sub/deeper/bomb.png")
    (folder / "notes.txt").write_text("ignore me")
    broken = {
        "sub/trunc.png": "OSError: image file is truncated",
        "bad.jpg": "UnidentifiedImageError: ",
        "sub/zero.png": "UnidentifiedImageError: ",
        "sub/deeper/bomb.png": "DecompressionBombWarning: ",
    }
    set_params(repo, {"image.infer.source": str(folder), "image.infer.batch_size": 3})
    out = tmp_path / "pred.csv"
    code = (
        "import sys; from pathlib import Path; from stages.core.params import load_params; "
        "from stages.image.infer import run as infer_image; "
        f"infer_image(load_params(), out=Path({str(out)!r})); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')); "
        "assert not bad, bad; print('ok')"
    )
    res = run_python(repo, code)
    assert res.stdout.strip().endswith("ok")
    assert "4 could not be read (see the error column)" in res.stderr

    preds = pd.read_csv(out)
    files = sorted(
        f.relative_to(folder).as_posix()
        for f in folder.rglob("*")
        if f.is_file() and f.suffix != ".txt"
    )
    assert preds["path"].tolist() == files  # every image file, in order, once
    bad = preds.set_index("path").loc[sorted(broken)]
    for path, start in broken.items():
        assert bad.loc[path, "error"].startswith(start), (path, bad.loc[path, "error"])
    assert (
        bad["prediction"].isna().all()
        and bad["probability"].isna().all()
        and bad["top_k"].isna().all()
    )
    good = preds[~preds["path"].isin(broken)].set_index("path")
    assert len(good) == 10 and good["error"].isna().all()
    assert set(good["prediction"]) <= set(PATTERNS) and good["probability"].between(0.25, 1).all()
    for copy, original in (
        ("sub/deeper/d.bmp", "a.png"),
        ("sub/deeper/e.webp", "a.png"),
        ("f.png", "sub/g.png"),
    ):
        assert good.loc[copy].tolist() == good.loc[original].tolist(), (copy, original)
    assert (
        good.loc["a.png", "probability"] != good.loc["sub/g.png", "probability"]
    )  # colour reaches the model
    for i, row in batch.iterrows():
        known = good.loc[f"known{i}{Path(row['path']).suffix}"]
        assert known["prediction"] == row["prediction"] and known["probability"] == pytest.approx(
            row["probability"], abs=2e-6
        )
    stats = read_json(repo / "metrics/image/infer.json")
    assert stats["images"] == len(files) and stats["failed"] == 4 and "images_per_s" not in stats
