"""Bench section `tabular_cost`: the tabular train stage beside HistGradientBoosting's fit, in
one run, on a 50,000-row table shaped like ggplot2's diamonds (a heavy-tailed size, three
ordered categories, three correlated dimensions, a price that grows as a power of the size
with multiplicative noise: a regression). Synthetic so that the bench needs no download;
the real tables are `python -m tools.realtables` (docs/tabular.md).

Targets (issue 29): the train stage within 20x HGB's fit time, and under 60 s on 50k rows.
Issue 39: the network and boosting (train + boost stages) at most 1.5x the network alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from tools.bench.timing import Row


def diamonds_shaped(path: Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    carat = np.round(rng.lognormal(-0.4, 0.55, rows), 2)
    cut = rng.choice(
        ["Fair", "Good", "Very Good", "Premium", "Ideal"], rows, p=[0.03, 0.09, 0.22, 0.26, 0.4]
    )
    color = rng.choice(list("DEFGHIJ"), rows)
    clarity = rng.choice(["I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"], rows)
    x = np.round(6.4 * carat ** (1 / 3) + rng.normal(0, 0.05, rows), 2)
    quality = (
        pd.Series(cut)
        .map({"Fair": 0, "Good": 1, "Very Good": 2, "Premium": 3, "Ideal": 4})
        .to_numpy()
        * 0.04
        + (6 - np.array(["DEFGHIJ".index(c) for c in color])) * 0.05
        + np.array(
            [["I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"].index(c) for c in clarity]
        )
        * 0.07
    )
    price = np.round(3900 * carat**1.7 * np.exp(quality - 0.6 + rng.normal(0, 0.15, rows)))
    df = pd.DataFrame(
        {
            "carat": carat,
            "cut": cut,
            "color": color,
            "clarity": clarity,
            "depth": np.round(rng.normal(61.7, 1.4, rows), 1),
            "table": np.round(rng.normal(57.5, 2.2, rows)),
            "x": x,
            "y": np.round(x + rng.normal(0, 0.05, rows), 2),
            "z": np.round(x * 0.618 + rng.normal(0, 0.04, rows), 2),
            "price": price,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def tabular_cost(quick: bool, scratch: Path) -> dict:
    from tools.realtables import run_table, summary

    rows = 2_000 if quick else 50_000
    csv = diamonds_shaped(scratch / "diamonds.csv", rows)
    sets = {"tabular.train.epochs": 2} if quick else {}
    t0 = time.perf_counter()
    result = summary("diamonds-shaped", run_table(csv, "price", "regression", [], sets, scratch))
    train_s, hgb_s = result["train_s"], result["hgb_fit_s"]
    ratio = train_s / max(hgb_s, 1e-3)
    row = Row(
        f"train stage vs HGB fit, {rows:,}-row diamonds-shaped regression",
        ("train stage", train_s, "s"),
        ("HGB fit", hgb_s, "s"),
        ratio,
        "<= 20x, and < 60 s on 50k rows",
        None if quick else ratio <= 20 and train_s < 60,
        extra={"r2_network": result["network"], "r2_hgb": result["hgb"]},
    )
    both = (train_s + result["boost_s"]) / train_s
    boost_row = Row(
        "train + boost stages vs the train stage (the network alone)",
        ("train + boost", train_s + result["boost_s"], "s"),
        ("train", train_s, "s"),
        both,
        "<= 1.5x",
        None if quick else both <= 1.5,
        extra={"r2_served": result["served"], "r2_boosting": result["boosting"]},
    )
    notes = [
        f"R² served {result['served']} (weights {result['weights']}), network {result['network']}, "
        f"boosting {result['boosting']}, HGB {result['hgb']}; "
        f"{result['rows']} training rows, batch {result['batch_size']}, {result['epochs']} epochs; "
        f"prepare + train + boost + evaluate {time.perf_counter() - t0:.0f} s"
    ]
    return {"rows": [row, boost_row], "notes": notes, "details": result}
