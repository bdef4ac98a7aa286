"""prepare: any CSV → typed train/val/test parquet splits + schema.json in data/prepared/tabular/.

    python -m stages prepare tabular
"""
from __future__ import annotations

from stages.core.common import atomic_dir, log, write_json
from stages.core.splits import split
from stages.tabular.data import check_target, normalise_columns, read_csv


def run(params: dict, out_dir: str = "data/prepared/tabular") -> dict:
    p = params["tabular"]["data"]
    source, target, task = p["source"], p["target"], p["task"]
    raw = read_csv(source)
    unknown = [c for c in p["drop_columns"] if c not in raw.columns]
    if unknown:
        log(f"warning: tabular.data.drop_columns names columns not in {source}: {', '.join(unknown)}")
    raw = raw.drop(columns=[c for c in p["drop_columns"] if c in raw.columns])
    if target in raw.columns and task == "classification":
        # Class labels are names, even when they look like numbers (0/1, 1..5).
        raw[target] = raw[target].map(lambda v: v if v != v else str(v).strip())
    check_target(raw, target, task, source)
    df, kinds = normalise_columns(raw, source, p["max_categories"])
    check_target(df, target, task, source)
    kinds.pop(target)
    splits = split(df, target, task, p["split"]["val"], p["split"]["test"], params["seed"], source)
    schema = {
        "source": source,
        "target": target,
        "task": task,
        "features": [{"name": c, "type": k} for c, k in kinds.items()],
        "classes": sorted(df[target].unique().tolist()) if task == "classification" else None,
        "rows": {name: len(part) for name, part in splits.items()},
        "params": {"seed": params["seed"], "tabular.data": p},
    }
    with atomic_dir(out_dir) as tmp:
        for name, part in splits.items():
            part.to_parquet(tmp / f"{name}.parquet")
        write_json(tmp / "schema.json", schema)
    log(f"prepared {source}: " + ", ".join(f"{k} {v} rows" for k, v in schema["rows"].items()) + f" → {out_dir}")
    return schema
