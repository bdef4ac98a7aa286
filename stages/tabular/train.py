"""train: the MLP on the preprocessed features, through the shared loop (stages/core/job.py).

    python -m stages train tabular
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from stages.core.common import read_json
from stages.core.job import Job, train
from stages.core.trainer import classification_sums, regression_sums
from stages.tabular.data import Preprocessor
from stages.tabular.model import build_model


def tensors(df: pd.DataFrame, pre: Preprocessor, schema: dict, scaling: dict | None) -> TensorDataset:
    x = torch.from_numpy(pre.transform(df))
    target = df[schema["target"]]
    if schema["task"] == "classification":
        y = torch.from_numpy(pd.Categorical(target, categories=schema["classes"]).codes.astype(np.int64))
    else:
        y = torch.from_numpy(((target.to_numpy("float64") - scaling["mean"]) / scaling["std"]).astype(np.float32))
    return TensorDataset(x, y)


def job(params: dict) -> Job:
    p = params["tabular"]["train"]
    prepared = Path("data/prepared/tabular")
    schema = read_json(prepared / "schema.json")
    train_df = pd.read_parquet(prepared / "train.parquet")
    val_df = pd.read_parquet(prepared / "val.parquet")
    pre = Preprocessor.fit(train_df, {f["name"]: f["type"] for f in schema["features"]})
    scaling = None
    if schema["task"] == "regression":
        t = train_df[schema["target"]]
        scaling = {"mean": float(t.mean()), "std": float(t.std(ddof=0)) or 1.0}
    n_out = len(schema["classes"]) if schema["task"] == "classification" else 1
    arch = {"kind": "mlp", "n_in": pre.n_features, "hidden": list(p["hidden"]), "n_out": n_out,
            "dropout": float(p["dropout"])}
    return Job(build_model(arch), arch, tensors(train_df, pre, schema, scaling),
               tensors(val_df, pre, schema, scaling),
               classification_sums if schema["task"] == "classification" else regression_sums,
               [prepared / "train.parquet", prepared / "val.parquet"],
               {"preprocessor": pre.to_dict(), "schema": schema, "target_scaling": scaling})


def run(params: dict) -> None:
    train("tabular", params, job)
