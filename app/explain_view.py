"""How the UI shows an explanation (docs/explain.md): a tabular answer's top contributions
as a bar chart's table, an image's heatmap laid over it."""

from __future__ import annotations

import base64
import io

import pandas as pd
from PIL import Image, ImageOps

TOP_CONTRIBUTIONS = 8  # bars beside a tabular answer
HEAT = "where the predicted class's evidence is (red: most; docs/explain.md)"
WHY = "why: each column's share of the answer, from the training average (docs/explain.md)"


def bars(x: str, y: str, label: str, elem_id: str) -> dict:
    """gr.BarPlot's arguments: the longest bar first."""
    return {"x": x, "y": y, "label": label, "elem_id": elem_id, "height": 240, "sort": "-y"}


def top_contributions(pred: dict) -> pd.DataFrame:
    """The columns that moved the answer most from the training data's average, either way."""
    top = sorted(pred["attributions"].items(), key=lambda kv: -abs(kv[1]))[:TOP_CONTRIBUTIONS]
    return pd.DataFrame(top, columns=["column", "contribution"])


def overlay(path: str, heatmap_png: str) -> Image.Image:
    """The image with the map over it: red where the evidence for the class is strongest,
    yellow in between, blue where there is none."""
    heat = Image.open(io.BytesIO(base64.b64decode(heatmap_png)))
    colour = ImageOps.colorize(heat, black="#2040ff", white="#ff2000", mid="#ffe000")
    with Image.open(path) as im:
        return Image.blend(im.convert("RGB"), colour, 0.45)
