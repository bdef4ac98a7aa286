"""Object detection: the torch-free pre/post-processing (resize, letterbox, EXIF, NMS, decode)
against OpenCV, Ultralytics and torchvision.
"""

from __future__ import annotations

import detect_helpers
import numpy as np
import pytest
from PIL import Image

from stages.detect.boxes import decode, letterbox, load_for_detection, nms, resize_bilinear

# HOME for every subprocess of this module (detect_helpers.fake_home).
fake_home = pytest.fixture(scope="module", autouse=True)(detect_helpers.fake_home)


# --- the numpy inference helpers against OpenCV, Ultralytics, torchvision -----------------------


@pytest.mark.parametrize(
    "src,dst",
    [
        ((37, 53), (101, 77)),
        ((101, 77), (37, 53)),
        ((64, 64), (32, 32)),
        ((33, 65), (64, 127)),
        ((7, 9), (3, 2)),
        ((3, 300), (1, 64)),
        ((99, 99), (33, 33)),
        ((20, 20), (20, 20)),
    ],
)
def test_resize_bilinear_matches_opencv(src, dst):
    import cv2

    img = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), dtype=np.uint8)
    got = resize_bilinear(img, dst[1], dst[0])
    ref = cv2.resize(img, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref).max() <= 1  # OpenCV rounds with 11-bit fixed-point weights


@pytest.fixture(scope="module")
def ultralytics_letterbox(tmp_path_factory):
    """Ultralytics' LetterBox, imported with its settings in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo_config")))
        from ultralytics.data.augment import LetterBox
    return LetterBox


@pytest.mark.parametrize(
    "shape", [(48, 80), (80, 48), (37, 53), (200, 120), (64, 64), (2, 300), (300, 2)]
)
@pytest.mark.parametrize("size", [64, 63])
def test_letterbox_matches_ultralytics(ultralytics_letterbox, shape, size):
    img = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ref = ultralytics_letterbox(new_shape=(size, size), auto=False, scale_fill=False, center=True)(
        image=img
    )
    got, r, (left, top) = letterbox(img, size)
    assert got.shape == ref.shape == (size, size, 3)
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert r == min(size / shape[0], size / shape[1])
    # The returned offsets are where the image starts: all 114 before them.
    assert (got[:top] == 114).all() and (got[:, :left] == 114).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_for_detection_reads_images_upright_as_ultralytics(
    ultralytics_letterbox, tmp_path, orientation
):
    """A photo with an EXIF orientation: Ultralytics reads it with OpenCV, upright; so must we."""
    import cv2

    rgb = np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path, exif=exif)
    bgr = cv2.imread(str(path))
    ref = ultralytics_letterbox(new_shape=(64, 64), auto=False, center=True)(image=bgr)[..., ::-1]
    x, meta = load_for_detection(path, 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert np.abs(np.round(x.transpose(1, 2, 0) * 255).astype(int) - ref).max() <= 1
    assert (meta["height"], meta["width"]) == bgr.shape[:2]


def test_nms_matches_torchvision():
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    for n, iou in ((1, 0.5), (50, 0.3), (300, 0.5), (300, 0.7), (1000, 0.45)):
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2))], axis=1)
        scores = rng.uniform(0, 1, n)
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        got = nms(boxes, scores, iou)
        assert got.tolist() == ref.tolist(), (n, iou)
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_decode_a_hand_built_output():
    # A 100×50 image letterboxed into 64: scale 0.64, 64×32 pixels, 16 rows of padding on top.
    _, r, pad = letterbox(np.zeros((50, 100, 3), np.uint8), 64)
    assert (r, pad) == (0.64, (0, 16))
    meta = {"scale": r, "pad": pad, "width": 100, "height": 50}
    anchors = [  # cx, cy, w, h in letterboxed pixels; score of class 0, class 1
        (32, 32, 20, 10, 0.05, 0.90),  # kept: class 1
        (33, 32, 20, 10, 0.10, 0.80),  # IoU 0.9 with the first, same class: suppressed
        (32, 32, 20, 10, 0.70, 0.01),  # the first box again, class 0: kept (NMS is per class)
        (50, 40, 10, 10, 0.20, 0.24),  # under conf 0.25: dropped
        (2, 20, 10, 10, 0.50, 0.30),  # sticks out of the image: clipped to it
    ]
    output = np.array(anchors, np.float32).T  # (4 + classes, anchors), as the model writes it
    got = decode(output, meta, conf=0.25, iou=0.7)
    expected = [
        [22 / 0.64, 11 / 0.64, 42 / 0.64, 21 / 0.64, 0.90, 1],
        [22 / 0.64, 11 / 0.64, 42 / 0.64, 21 / 0.64, 0.70, 0],
        [0, 0, 7 / 0.64, 9 / 0.64, 0.50, 0],
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        decode(output, meta, conf=0.25, iou=0.7, max_det=2), expected[:2], atol=1e-5
    )
    assert decode(output, meta, conf=0.95, iou=0.7).shape == (0, 6)


def test_map_disagreement_is_a_warning_with_the_gap_the_test_set_explains():
    """Issue 37: pycocotools and Ultralytics 0.0218 apart on 7 test images is a warning that
    says how much a test set that small explains, never a stop."""
    from stages.detect.evaluate import disagreement, explained_gap

    small = {"annotations": [{"category_id": 1}] * 5 + [{"category_id": 2}] * 3}
    assert explained_gap(small) == round((1 / 5 + 1 / 3) / 2, 4)
    text = disagreement({"mAP50": 0.01, "mAP50-95": 0.0218}, 0.02, explained_gap(small))
    assert "0.0218" in text and "within the 0.2667" in text
    large = {"annotations": [{"category_id": 1}] * 1000}
    assert "beyond the 0.0010" in disagreement({"mAP50": 0.03}, 0.02, explained_gap(large))
