"""Image classification: the torch-free core (indexing, decoding, preprocessing, top-k).
Images are generated (tests/image_helpers.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from image_helpers import (
    pattern,
    save_image,
    truncated_png,
)
from PIL import Image

from stages.core.cli import StageError
from stages.core.images import image_extensions, inspect_image, list_images
from stages.image.data import load_rgb, normalise, preprocess, top_k

# --- the torch-free core -------------------------------------------------------------


def test_list_images_reads_an_image_folder(tmp_path: Path):
    root = tmp_path / "imgs"
    save_image(pattern("checker", 16, 16, 0), root / "cat" / "a", 0)
    save_image(pattern("checker", 16, 16, 1), root / "cat" / "deep" / "b", 1)  # nested: found
    save_image(pattern("square", 16, 16, 2), root / "dog" / "c", 3)
    (root / "dog" / "notes.txt").write_text("not an image")  # ignored
    (root / "README.md").write_text("not a class")  # ignored
    save_image(pattern("square", 16, 16, 3), root / ".cache" / "d", 0)  # hidden: not a class
    table, base = list_images(root)
    assert base == root
    assert table.to_dict("list") == {
        "path": ["cat/a.png", "cat/deep/b.jpg", "dog/c.png"],
        "label": ["cat", "cat", "dog"],
    }
    assert {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif"} <= image_extensions()


def test_list_images_reads_a_manifest_relative_to_itself(tmp_path: Path):
    save_image(pattern("checker", 16, 16, 0), tmp_path / "data" / "pics" / "x", 0)
    save_image(pattern("square", 16, 16, 1), tmp_path / "data" / "y", 1)
    manifest = tmp_path / "data" / "labels.csv"
    manifest.write_text("path,label,comment\npics/x.png,0,first\ny.jpg,1,\n")
    table, base = list_images(manifest)
    assert base == manifest.parent
    assert table.to_dict("list") == {
        "path": ["pics/x.png", "y.jpg"],
        "label": ["0", "1"],
    }  # labels stay text
    assert all((base / p).is_file() for p in table["path"])


def list_inputs(source):
    table, root = list_images(source, labelled=False)
    return table["path"].tolist(), root


def test_list_inputs_for_inference(tmp_path: Path):
    folder = tmp_path / "in"
    save_image(pattern("checker", 16, 16, 0), folder / "z", 0)
    save_image(pattern("checker", 16, 16, 1), folder / "a" / "b" / "deep", 1)
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "bad.JPEG").write_text("not an image either, but named like one: listed")
    assert list_inputs(folder) == (["a/b/deep.jpg", "bad.JPEG", "z.png"], folder)
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "path,label\nin/z.png,x\nin/missing.png,y\n"
    )  # a missing file is that row's error
    assert list_inputs(manifest) == (["in/z.png", "in/missing.png"], tmp_path)

    (tmp_path / "empty").mkdir()
    cases = {
        "empty": r"empty: no image files \(searched recursively\)",
        "nothing.csv": r"nothing\.csv: not found",
        "blank.csv": r"blank\.csv: not a readable manifest",
        "header.csv": r"header\.csv: the manifest lists no images",
        "nopath.csv": r"nopath\.csv: manifest needs columns path; missing: path",
    }
    (tmp_path / "blank.csv").write_text("")
    (tmp_path / "header.csv").write_text("path\n")
    (tmp_path / "nopath.csv").write_text("file\nin/z.png\n")
    for name, message in cases.items():
        with pytest.raises(StageError, match=message):
            list_inputs(tmp_path / name)


def test_inspect_image_reports_each_kind_of_bad_file(tmp_path: Path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((23, 37), np.uint8), "L").save(good)
    info = inspect_image(good)
    data = good.read_bytes()
    assert info == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": 37,
        "height": 23,
        "mode": "L",
        "error": None,
    }

    trunc = inspect_image(truncated_png(tmp_path / "trunc.png"))
    assert trunc["error"].startswith("OSError: image file is truncated") and trunc["bytes"] > 0
    empty = tmp_path / "zero.png"
    empty.write_bytes(b"")
    assert inspect_image(empty)["error"] == "empty file (0 bytes)"
    text = tmp_path / "x.png"
    text.write_text("this is not a picture\n")
    info = inspect_image(text)
    assert (
        info["error"].startswith("UnidentifiedImageError: cannot identify image file")
        and "x.png" in info["error"]
    )
    assert info["width"] is None and info["mode"] is None


def test_inspect_image_treats_both_bomb_ranges_as_errors(tmp_path: Path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)  # 1200 pixels
    assert inspect_image(path)["error"] is None
    # Warning range: MAX < pixels <= 2 * MAX, where PIL itself only warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    info = inspect_image(path)
    assert info["error"].startswith(
        "decompression bomb: Image size (1200 pixels) exceeds limit of 1000 pixels"
    )
    with pytest.raises(Image.DecompressionBombWarning):  # the serving path refuses it too
        load_rgb(path, 8)
    # Error range: pixels > 2 * MAX, where PIL raises.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert inspect_image(path)["error"].startswith(
        "decompression bomb: Image size (1200 pixels) exceeds limit of"
    )
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(path, 8)


def test_every_mode_becomes_normalised_rgb_nchw(tmp_path: Path):
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]  # different per channel: catches a channel mix-up
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))  # alpha dropped, colour kept
    gray = Image.new("L", (16, 16), 100)  # replicated into 3 channels
    pal = Image.new("P", (16, 16), 3)
    pal.putpalette([0, 0, 0] * 3 + [200, 50, 25] + [0, 0, 0] * 252)  # palette entry 3
    odd = Image.new("RGB", (37, 23), (1, 128, 255))  # not square, not the target size
    colours = [(10, 20, 30), (100, 100, 100), (200, 50, 25), (1, 128, 255)]
    paths = []
    for name, im in (("rgba.png", rgba), ("gray.png", gray), ("pal.png", pal), ("odd.jpg", odd)):
        im.save(tmp_path / name, quality=100) if name.endswith("jpg") else im.save(tmp_path / name)
        paths.append(tmp_path / name)
    assert [Image.open(p).mode for p in paths] == ["RGBA", "L", "P", "RGB"]

    for p, colour in zip(paths[:3], colours, strict=False):
        rgb = load_rgb(p, 12)
        assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8
        assert (rgb == colour).all(), (p.name, rgb[0, 0])
    assert np.abs(load_rgb(paths[3], 12).astype(int) - colours[3]).max() <= 2  # JPEG

    x = preprocess(paths, {"image_size": 12, "mean": mean, "std": std})
    assert x.shape == (4, 3, 12, 12) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    for i, colour in enumerate(colours[:3]):
        for c in range(3):
            expected = (colour[c] / 255.0 - mean[c]) / std[c]
            np.testing.assert_allclose(x[i, c], expected, rtol=0, atol=1e-6)

    # Layout: a left half red and right half blue image stays left/right in W and red/blue in C.
    half = np.zeros((1, 4, 6, 3), np.uint8)
    half[:, :, :3, 0], half[:, :, 3:, 2] = 255, 51
    x = normalise(half, [0, 0, 0], [1, 1, 1])
    assert x.shape == (1, 3, 4, 6)
    assert (x[0, 0, :, :3] == 1.0).all() and (x[0, 0, :, 3:] == 0).all()
    np.testing.assert_allclose(x[0, 2, :, 3:], 0.2, atol=1e-7)
    assert (x[0, 1] == 0).all() and (x[0, 2, :, :3] == 0).all()
    assert preprocess([], {"image_size": 12, "mean": mean, "std": std}).shape == (0, 3, 12, 12)


def test_top_k_lists_the_most_likely_classes():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.15, 0.35]])
    assert top_k(probs, ["a", "b", "c"], 2) == ["b:0.700 c:0.200", "a:0.500 c:0.350"]
    assert top_k(probs, ["a", "b", "c"], 1) == ["b:0.700", "a:0.500"]
    assert top_k(probs, ["a", "b", "c"], 5) == [
        "b:0.700 c:0.200 a:0.100",
        "a:0.500 c:0.350 b:0.150",
    ]
