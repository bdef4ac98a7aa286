"""The benchmark sections, one module each under tools/bench/ (a new section is a new module
and a line here). Every section function takes `quick` (tiny sizes, for the test that keeps
this code from rotting) and a scratch folder, and returns
{"rows": [Row], "notes": [str], "details": {...}}.

All of them run from the repository root (bench/__main__.py changes into it) and only
read what is there: the trained models in models/, data/prepared/, the suites in
data/expectations/. Whatever they write goes to the scratch folder.
"""

from __future__ import annotations

from tools.bench.batch import batch
from tools.bench.edge import edge
from tools.bench.ensemble import ensemble
from tools.bench.explain import explain
from tools.bench.inference import inference
from tools.bench.labels import labels
from tools.bench.large import large
from tools.bench.numerics import numerics
from tools.bench.pipeline import pipeline
from tools.bench.serving import serving
from tools.bench.tabular_cost import tabular_cost
from tools.bench.training import training
from tools.bench.trust import trust
from tools.bench.validation import validation

SECTIONS = {
    "inference": inference,
    "serving": serving,
    "batch": batch,
    "training": training,
    "validation": validation,
    "pipeline": pipeline,
    "trust": trust,
    "explain": explain,
    "edge": edge,
    "labels": labels,
    "numerics": numerics,
    "tabular_cost": tabular_cost,
    "ensemble": ensemble,
    "large": large,
}
OPT_IN = {"large"}  # run only when named in --only
