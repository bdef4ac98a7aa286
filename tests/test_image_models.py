"""Image classification: the models (every arch, local pretrained weights, fine-tuning, the
decoded-image cache, a last batch of one).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.cli import StageError
from stages.image.data import load_rgb, normalise

# --- the models ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_every_arch_runs_on_small_images(size: int):
    import torch

    from stages.image.model import IMAGE_ARCHS, build_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    for arch in IMAGE_ARCHS:
        model = build_model({"name": arch, "num_classes": 5})
        for mode in (model.train, model.eval):
            mode()
            with torch.no_grad():
                out = model(x)
            assert out.shape == (2, 5), (arch, size, out.shape)
            assert torch.isfinite(out).all(), arch


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path):
    import torch
    import torchvision

    from stages.image.model import build_model

    torch.manual_seed(1)
    saved = torchvision.models.resnet18(weights=None).state_dict()  # 1000 ImageNet classes
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    model = build_model({"name": "resnet18", "num_classes": 4}, pretrained=str(path))
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert len(backbone) > 100 and set(state) == set(saved)
    for k in backbone:
        assert torch.equal(state[k], saved[k]), k
    assert model.fc.out_features == 4 and state["fc.weight"].shape == (4, 512)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    # Not pretrained: the same backbone keys hold other (random) weights.
    fresh = build_model({"name": "resnet18", "num_classes": 4}).state_dict()
    assert not torch.equal(fresh["conv1.weight"], saved["conv1.weight"])

    with pytest.raises(StageError, match=r"image\.train\.pretrained: .*nothing\.pth: no such file"):
        build_model(
            {"name": "resnet18", "num_classes": 4}, pretrained=str(tmp_path / "nothing.pth")
        )
    other = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), other)
    with pytest.raises(StageError, match=r"mobilenet\.pth: not a resnet18 state dict"):
        build_model({"name": "resnet18", "num_classes": 4}, pretrained=str(other))
    # Not torch files at all, or not a dict: the same one-line error, not a traceback.
    (tmp_path / "junk.pth").write_text("not a torch file")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name in ("junk.pth", "empty.pth", "tensor.pth"):
        with pytest.raises(
            StageError, match=rf"{re.escape(name)}: not a resnet18 state dict \(.+\)"
        ):
            build_model({"name": "resnet18", "num_classes": 4}, pretrained=str(tmp_path / name))


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_fine_tune_from_an_earlier_runs_model(tmp_path: Path, arch: str):
    """image.train.pretrained: an earlier run's models/image/model.pt (state_dict + meta), for
    every arch: all tensors with the same classes; another class count: all but the head."""
    import torch

    from stages.image.model import build_model

    torch.manual_seed(3)
    earlier = build_model({"name": arch, "num_classes": 10})
    path = tmp_path / "model.pt"
    torch.save(
        {"state_dict": earlier.state_dict(), "meta": {"arch": {"name": arch, "num_classes": 10}}},
        path,
    )
    same = build_model({"name": arch, "num_classes": 10}, pretrained=str(path)).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in earlier.state_dict().items())
    fewer = build_model({"name": arch, "num_classes": 4}, pretrained=str(path)).state_dict()
    differ = [k for k, v in earlier.state_dict().items() if v.shape != fewer[k].shape]
    assert differ and len(differ) <= 2  # the head's weight and bias
    assert all(torch.equal(v, fewer[k]) for k, v in earlier.state_dict().items() if k not in differ)
    other = "resnet18" if arch == "small_cnn" else "small_cnn"
    with pytest.raises(StageError, match=rf"is a {arch} model; image\.train\.arch is {other}"):
        build_model({"name": other, "num_classes": 10}, pretrained=str(path))
    if arch == "small_cnn":
        torch.save(earlier.state_dict(), tmp_path / "plain.pth")
        with pytest.raises(
            StageError, match="small_cnn starts from an earlier run's models/image/model.pt only"
        ):
            build_model({"name": arch, "num_classes": 10}, pretrained=str(tmp_path / "plain.pth"))


def test_decoded_once_and_augmented_per_batch(tmp_path: Path, monkeypatch):
    """Training images are decoded once (by the serving decode) into a memory-mapped cache
    that the next run reuses; a batch is augmented as a whole and normalised as served."""
    import torch

    from stages.image import train as image_train

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
    from stages.core.schema import Augment

    still = Augment(rotate=0.0, translate=0.0, scale=[1.0, 1.0], hflip=False)
    torch.testing.assert_close(image_train.random_affine(batch, still), batch, atol=1e-3, rtol=0)
    torch.manual_seed(0)
    flipped = image_train.random_affine(batch, still.model_copy(update={"hflip": True}))
    mirrored = [
        torch.allclose(f, b.flip(-1), atol=1e-3) for f, b in zip(flipped, batch, strict=False)
    ]
    kept = [torch.allclose(f, b, atol=1e-3) for f, b in zip(flipped, batch, strict=False)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=False)) and any(mirrored)
    moved = image_train.random_affine(
        batch, Augment(rotate=10.0, translate=0.1, scale=[0.9, 1.1], hflip=False)
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
    model = build_model({"name": "mobilenet_v3_small", "num_classes": 2})
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
