"""Trust on the served (tiny) models of the session fixture: the card and metrics.json
carry it, the serving core (app/predict.py) flags an absurd penguin, noise and flat-colour
images, flags few of the test split, and batch `infer` writes the very same sets and flags.
The statistics on synthetic scores are in tests/test_trust.py."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(served_repo):
    from app.repository import load_models
    from app.settings import load_settings

    cfg = load_settings(served_repo / "params.yaml")
    loaded, missing = load_models(served_repo / "models", cfg)
    assert {"tabular", "image"} <= set(loaded), missing
    return loaded


def test_metrics_and_card_carry_trust(served_repo, models):
    for task in ("tabular", "image"):
        m = json.loads((served_repo / f"metrics/{task}/metrics.json").read_text())["test"]
        assert m["ece"] <= m["ece_uncalibrated"] + 1e-9, (task, m)
        assert 0 < m["coverage"] <= 1 and m["mean_set_size"] >= 1, (task, m)
        t = models[task].card.trust
        assert t["alpha"] == 0.1 and t["temperature"] > 0
        names = [o.name for o in models[task].session.get_outputs()]
        # image: and the class activation map of the predicted class (stages/image/cam.py)
        assert names == ["output", "features", *(["cam"] if task == "image" else [])]
        assert (served_repo / f"metrics/{task}/plots/reliability.json").is_file()


def test_tabular_test_split_mostly_unflagged_and_an_absurd_row_flagged(served_repo, models):
    from app.predict import predict_tabular

    tab = models["tabular"]
    test = pd.read_parquet(served_repo / "data/prepared/tabular/test.parquet")
    rows = json.loads(test.drop(columns="species").to_json(orient="records"))
    preds = predict_tabular(tab, rows)
    assert np.mean([p["ood"]["flagged"] for p in preds]) < 0.1
    covered = [p["prediction"] in p["prediction_set"] for p in preds]
    assert all(covered)  # the top class is always in the set
    absurd = {f.name: (1e6 if f.type == "numeric" else rows[0][f.name]) for f in tab.card.features}
    before = tab.monitor.flagged
    got = predict_tabular(tab, [absurd])[0]
    assert got["ood"]["flagged"] and got["ood"]["p_value"] < tab.card.trust["ood"]["threshold"]
    # ... and counted for /metrics' ood_flagged_total (deploy/'s OODShare alert)
    assert tab.monitor.flagged == before + 1


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_served_heatmap_is_a_grayscale_png_of_the_images_size(models):
    import base64
    import dataclasses

    from app.predict import BadInput, predict_image

    data = png(np.random.default_rng(0).integers(0, 256, (30, 40, 3)))  # 40 wide, 30 high
    r = predict_image(models["image"], data, 3, 10**7, explain=True)
    heat = Image.open(io.BytesIO(base64.b64decode(r["heatmap_png"])))
    assert heat.mode == "L" and heat.size == (40, 30)
    assert np.asarray(heat).max() in (0, 255)  # scaled to its own maximum (0: no evidence)
    assert "heatmap_png" not in predict_image(models["image"], data, 3, 10**7)
    card = models["image"].card.model_copy(
        update={"explain": {"cam": None, "why_no_cam": "two linear layers"}}
    )
    other = dataclasses.replace(models["image"], card=card)  # as a mobilenet_v3_small's card
    with pytest.raises(BadInput, match="no heatmap.*two linear layers"):
        predict_image(other, data, 1, 10**7, explain=True)


def test_noise_and_flat_images_are_flagged(models):
    from app.predict import predict_image

    rng = np.random.default_rng(0)
    size = 32
    noise = [png(rng.integers(0, 256, (size, size, 3))) for _ in range(5)]
    flat = [png(np.full((size, size, 3), c)) for c in ([0, 0, 0], [255, 255, 255], [200, 30, 30])]
    results = [predict_image(models["image"], b, 3, 10**7) for b in noise + flat]
    assert all(r["ood"]["flagged"] for r in results), [r["ood"] for r in results]


def test_serving_and_batch_infer_give_the_same_sets_and_flags(served_repo, models):
    from app.predict import predict_image, predict_tabular

    batch = pd.read_csv(served_repo / "data/predictions/tabular.csv")
    test = pd.read_parquet(served_repo / "data/prepared/tabular/test.parquet")
    rows = json.loads(test.drop(columns="species").to_json(orient="records"))
    served = predict_tabular(models["tabular"], rows)
    assert [p["prediction_set"] for p in served] == batch["prediction_set"].map(json.loads).tolist()
    assert [p["ood"]["flagged"] for p in served] == batch["ood_flagged"].tolist()
    np.testing.assert_allclose(
        [p["ood"]["p_value"] for p in served], batch["ood_p_value"], rtol=1e-5
    )
    images = pd.read_csv(served_repo / "data/predictions/image.csv").head(20)
    root = served_repo / "data/prepared/image"
    for row in images.itertuples():
        r = predict_image(models["image"], (root / row.path).read_bytes(), 3, 10**7)
        assert r["prediction_set"] == json.loads(row.prediction_set)
        assert r["ood"]["flagged"] == row.ood_flagged
        assert abs(r["ood"]["p_value"] - row.ood_p_value) < 1e-6
