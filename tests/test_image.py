"""Image classification: the torch-free core (indexing, decoding, preprocessing), the
models, `dvc repro` of the image chain on a tiny generated ImageFolder, bad inputs through
the real stage CLI, and torch-free inference over a folder with unreadable files in it.

Every image here is generated: a few classes of simple, learnable patterns in mixed
formats (PNG, JPEG, GIF, BMP, WebP), modes (RGB, RGBA, L, P) and odd sizes.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_repo, run, run_python, set_params, stage
from PIL import Image

from stages.core.cli import StageError
from stages.core.images import image_extensions, inspect_image, list_images
from stages.image.data import load_rgb, normalise, preprocess, top_k

# Four classes that survive grayscale, JPEG and resizing: they differ in pattern, not colour.
PATTERNS = ("checker", "hstripes", "square", "vstripes")
# A tiny run: seconds per stage. Only image.data.source changes besides these.
TINY_IMAGE = {
    "image.data.image_size": 16,
    "image.train.epochs": 3,
    "image.train.batch_size": 16,
    "image.train.amp": "off",
    "image.validate.min_per_class": 3,
}


# --- generated images ----------------------------------------------------------------


def pattern(kind: str, width: int, height: int, seed: int) -> np.ndarray:
    """height × width × 3 uint8: a class's pattern, a random tint and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    on = {
        "checker": (yy // 6 + xx // 6) % 2 == 0,
        "hstripes": (yy // 4) % 2 == 0,
        "vstripes": (xx // 4) % 2 == 0,
        "square": (abs(yy - height / 2) < height / 4) & (abs(xx - width / 2) < width / 4),
    }[kind]
    tint = rng.uniform(0.6, 1.0, 3)
    img = np.where(on[..., None], 230 * tint, 25 * tint) + rng.normal(0, 8, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def save_image(rgb: np.ndarray, path: Path, variant: int) -> Path:
    """Save in one of several format/mode combinations (variant cycles through them)."""
    im = Image.fromarray(rgb, "RGB")
    ext, mode = [
        ("png", "RGB"),
        ("jpg", "RGB"),
        ("png", "RGBA"),
        ("png", "L"),
        ("png", "P"),
        ("jpg", "L"),
    ][variant % 6]
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(np.full(rgb.shape[:2], 128 + variant, np.uint8)))
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        im = im.convert(mode)
    path = path.with_suffix(f".{ext}")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95) if ext == "jpg" else im.save(path)
    return path


def write_image_folder(root: Path, classes=PATTERNS, per_class: int = 12) -> Path:
    """An ImageFolder: root/<class>/<n>.<ext>, mixed formats, modes and sizes (16×16, 19×23,
    24×20); every third image of a class sits in a sub-folder (they are found recursively)."""
    sizes = [(16, 16), (19, 23), (24, 20)]
    for c, kind in enumerate(classes):
        for i in range(per_class):
            w, h = sizes[i % 3]
            sub = "more/" if i % 3 == 2 else ""
            save_image(pattern(kind, w, h, seed=100 * c + i), root / kind / f"{sub}{i:02d}", i + c)
    return root


def truncated_png(path: Path) -> Path:
    """A real PNG cut in half: it opens (the header is intact), but its pixels don't decode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bomb_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A valid 1-bit PNG of width × height zeros (100 M pixels: above PIL's default
    MAX_IMAGE_PIXELS of 89.5 M, below twice that, where PIL only warns), about 12 kB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"\0" * ((1 + (width + 7) // 8) * height)  # filter byte + packed row, all zero
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    return path


def read_json(path: Path):
    return json.loads(path.read_text())


def one_line_error(res, *patterns: str) -> str:
    """Exit 1, no traceback, stderr starting with `error: ...` (validate may first say that it
    created the suite), and every pattern found in it; returns stderr from `error:` on."""
    err = res.stderr
    assert res.returncode == 1, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    before, found, rest = err.partition("error: ")
    assert found and all(
        line.startswith("created data/expectations/image/") for line in before.splitlines()
    ), err
    err = found + rest
    for p in patterns:
        assert re.search(p, err), f"{p!r} not in:\n{err}"
    return err


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


# --- the models ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_every_arch_runs_on_small_images(size: int):
    import torch

    from stages.image.model import IMAGE_ARCHS, build_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    for kind in IMAGE_ARCHS:
        model = build_model({"kind": kind, "num_classes": 5})
        for mode in (model.train, model.eval):
            mode()
            with torch.no_grad():
                out = model(x)
            assert out.shape == (2, 5), (kind, size, out.shape)
            assert torch.isfinite(out).all(), kind


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path):
    import torch
    import torchvision

    from stages.image.model import build_model

    torch.manual_seed(1)
    saved = torchvision.models.resnet18(weights=None).state_dict()  # 1000 ImageNet classes
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    model = build_model({"kind": "resnet18", "num_classes": 4}, pretrained=str(path))
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert len(backbone) > 100 and set(state) == set(saved)
    for k in backbone:
        assert torch.equal(state[k], saved[k]), k
    assert model.fc.out_features == 4 and state["fc.weight"].shape == (4, 512)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    # Not pretrained: the same backbone keys hold other (random) weights.
    fresh = build_model({"kind": "resnet18", "num_classes": 4}).state_dict()
    assert not torch.equal(fresh["conv1.weight"], saved["conv1.weight"])

    with pytest.raises(StageError, match=r"image\.train\.pretrained: .*nothing\.pth: no such file"):
        build_model(
            {"kind": "resnet18", "num_classes": 4}, pretrained=str(tmp_path / "nothing.pth")
        )
    other = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), other)
    with pytest.raises(StageError, match=r"mobilenet\.pth: not a resnet18 state dict"):
        build_model({"kind": "resnet18", "num_classes": 4}, pretrained=str(other))
    # Not torch files at all, or not a dict: the same one-line error, not a traceback.
    (tmp_path / "junk.pth").write_text("not a torch file")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name in ("junk.pth", "empty.pth", "tensor.pth"):
        with pytest.raises(
            StageError, match=rf"{re.escape(name)}: not a resnet18 state dict \(.+\)"
        ):
            build_model({"kind": "resnet18", "num_classes": 4}, pretrained=str(tmp_path / name))


@pytest.mark.parametrize("kind", ["small_cnn", "resnet18"])
def test_fine_tune_from_an_earlier_runs_model(tmp_path: Path, kind: str):
    """image.train.pretrained: an earlier run's models/image/model.pt (state_dict + meta), for
    every arch: all tensors with the same classes; another class count: all but the head."""
    import torch

    from stages.image.model import build_model

    torch.manual_seed(3)
    earlier = build_model({"kind": kind, "num_classes": 10})
    path = tmp_path / "model.pt"
    torch.save(
        {"state_dict": earlier.state_dict(), "meta": {"arch": {"kind": kind, "num_classes": 10}}},
        path,
    )
    same = build_model({"kind": kind, "num_classes": 10}, pretrained=str(path)).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in earlier.state_dict().items())
    fewer = build_model({"kind": kind, "num_classes": 4}, pretrained=str(path)).state_dict()
    differ = [k for k, v in earlier.state_dict().items() if v.shape != fewer[k].shape]
    assert differ and len(differ) <= 2  # the head's weight and bias
    assert all(torch.equal(v, fewer[k]) for k, v in earlier.state_dict().items() if k not in differ)
    other = "resnet18" if kind == "small_cnn" else "small_cnn"
    with pytest.raises(StageError, match=rf"is a {kind} model; image\.train\.arch is {other}"):
        build_model({"kind": other, "num_classes": 10}, pretrained=str(path))
    if kind == "small_cnn":
        torch.save(earlier.state_dict(), tmp_path / "plain.pth")
        with pytest.raises(
            StageError, match="small_cnn starts from an earlier run's models/image/model.pt only"
        ):
            build_model({"kind": kind, "num_classes": 10}, pretrained=str(tmp_path / "plain.pth"))


def test_decoded_once_and_augmented_per_batch(tmp_path: Path, monkeypatch):
    """Training images are decoded once (by the serving decode) into a memory-mapped cache
    that the next run reuses; a batch is augmented as a whole and normalised as served."""
    import torch

    from stages.image import train as image_train
    from stages.image.data import load_rgb, normalise

    monkeypatch.chdir(tmp_path)
    paths = []
    for i in range(5):
        arr = np.random.default_rng(i).integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    schema = {"image_size": 16, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    plain = image_train.ImageSet(paths, np.arange(5), schema, None)
    assert len(list((tmp_path / ".cache/image/decoded").glob("*.npy"))) == 1
    for i, p in enumerate(paths):
        assert np.array_equal(plain[i][0].numpy(), load_rgb(p, 16))
    monkeypatch.setattr(image_train, "load_rgb", lambda *a: pytest.fail("decoded twice"))
    again = image_train.ImageSet(paths, np.arange(5), schema, None)  # from the cache
    x, y = again.collate([again[i] for i in range(5)])
    want = normalise(np.stack([load_rgb(p, 16) for p in paths]), schema["mean"], schema["std"])
    np.testing.assert_allclose(x.numpy(), want, atol=1e-5)
    assert y.tolist() == list(range(5))
    # No rotation, shift or zoom: the identity; a flip: the mirror image; otherwise a change.
    batch = torch.from_numpy(np.stack([load_rgb(p, 16) for p in paths])).permute(0, 3, 1, 2).float()
    still = {"rotate": 0, "translate": 0.0, "scale": [1.0, 1.0], "hflip": False}
    torch.testing.assert_close(image_train.random_affine(batch, still), batch, atol=1e-3, rtol=0)
    torch.manual_seed(0)
    flipped = image_train.random_affine(batch, {**still, "hflip": True})
    mirrored = [
        torch.allclose(f, b.flip(-1), atol=1e-3) for f, b in zip(flipped, batch, strict=False)
    ]
    kept = [torch.allclose(f, b, atol=1e-3) for f, b in zip(flipped, batch, strict=False)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=False)) and any(mirrored)
    moved = image_train.random_affine(
        batch, {"rotate": 10, "translate": 0.1, "scale": [0.9, 1.1], "hflip": False}
    )
    assert moved.shape == batch.shape and not torch.allclose(moved, batch)


def test_training_survives_a_last_batch_of_one_with_batchnorm(tmp_path: Path):
    """5 images in batches of 4 leave a batch of 1; at 16 px mobilenet_v3_small's last
    blocks see a 1×1 feature map, where BatchNorm cannot train on a single value per channel."""
    import torch
    from torch.utils.data import TensorDataset

    from stages.core.distributed import Runtime, seed_everything
    from stages.core.trainer import LoopConfig, classification_sums, fit
    from stages.image.model import build_model

    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(5, 3, 16, 16, generator=g), torch.tensor([0, 1, 0, 1, 0]))
    cfg = LoopConfig(
        epochs=1,
        batch_size=4,
        lr=0.01,
        weight_decay=0.0,
        scheduler="none",
        step_size=1,
        gamma=0.5,
        grad_clip=1.0,
        grad_accum=1,
        amp="off",
        patience=0,
        monitor="val_loss",
        num_workers=0,
        device="cpu",
        nproc=1,
    )
    model = build_model({"kind": "mobilenet_v3_small", "num_classes": 2})
    first = model.features[0][0].weight
    before = first.detach().clone()
    summary = fit(
        model,
        data,
        data,
        sums_fn=classification_sums,
        cfg=cfg,
        rt=Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
        seed=0,
        ckpt_dir=tmp_path,
        fingerprint="bn",
    )
    assert summary["epochs_run"] == 1 and np.isfinite(summary["best_metrics"]["val_loss"])
    assert not torch.equal(first, before)  # and it trained


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
        "data/prepared/image/schema.json",
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
    schema = read_json(repo / "data/prepared/image/schema.json")
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
    schema = read_json(prepared / "schema.json")
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
