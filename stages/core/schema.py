"""The schema of params.yaml, as code: every key, its type, allowed values and range.

It is written here, never derived from params.yaml, so a typo there cannot define its own key.
`validate(params)` runs when a stage, a tool or the server loads params.yaml (load_params) and
turns the first problem into one line that names the full dotted key:

    params.yaml: tabular.train.hiden: unknown key (did you mean tabular.train.hidden?)

One class per section: a new key is one line in its section's class (plus its comment in
params.yaml and its row in docs/params.md, which tests/test_schema.py checks against this).
Torch-free: infer and app/ load params too.
"""

from __future__ import annotations

import copy
import difflib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.core.cli import StageError
from stages.core.documents import KeepsRead

Fraction = Annotated[float, Field(gt=0, lt=1)]
Share = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
# The one list of each setting's allowed values: code imports these (typing.get_args) rather
# than repeating them.
Task = Literal["tabular", "image", "detect"]  # stages/<task>/, models/<task>/
Arch = Literal["small_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0"]
Scheduler = Literal["cosine", "step", "plateau", "none"]
Amp = Literal["auto", "off", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
Engine = Literal["pandas", "spark"]
SplitMethod = Literal["hash", "sklearn"]
TabularTask = Literal["auto", "classification", "regression"]
Role = Literal["drop", "numeric", "categorical", "boolean", "datetime", "text"]
Duplicates = Literal["fail", "drop"]
BoxFormat = Literal["yolo", "coco", "voc"]
Graph = Literal["raw", "nms", "end2end"]


class Section(KeepsRead):
    # strict: a quoted "80" is not an int, 1 is not true; an int is still a valid float.
    # frozen: a stage reads its settings; other values are a new object (replaced, model_copy).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # KeepsRead: plain() keeps the key order and the spelling of a number of what was read
    # (rotate: 10, not the float 10.0), so outputs that record params stay as before.


# ---- shared shapes ----


class Loop(Section):
    """The training loop's keys (stages/core/trainer.py LoopConfig), shared by tabular and image."""

    epochs: Positive
    batch_size: Positive
    lr: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)]
    scheduler: Scheduler
    step_size: Positive
    gamma: Annotated[float, Field(gt=0, le=1)]
    grad_clip: Annotated[float, Field(ge=0)]
    grad_accum: Positive
    # YAML 1.1 (PyYAML) reads an unquoted `off` as false, and DVC's -S writes it unquoted
    amp: Amp | Literal[False]
    compile: bool
    patience: Count
    num_workers: Count
    device: Device
    nproc: Positive


class Split(Section):
    val: Fraction
    test: Fraction


# ---- tabular ----


class TabularSplit(Split):
    method: SplitMethod


class TabularData(Section):
    source: str
    target: str
    task: TabularTask
    # column → role (stages/tabular/roles.py); `drop` is how a column is left out
    roles: dict[str, Role]
    max_categories: Positive
    engine: Engine
    split: TabularSplit
    exclude_lines: list[Annotated[int, Field(ge=2)]]  # CSV file lines (header = 1)


class TabularLabels(Section):
    """The labels stage (stages/core/label_issues.py): K-fold, and each fold's short MLP."""

    folds: Annotated[int, Field(ge=2)]
    epochs: Positive
    batch_size: Positive
    lr: Annotated[float, Field(gt=0)]
    hidden: Annotated[list[Positive], Field(min_length=1)]
    dropout: Annotated[float, Field(ge=0, lt=1)]


class TabularValidate(Section):
    range_margin: Annotated[float, Field(ge=0)]
    confidence: Fraction
    chunk_rows: Positive


class TabularTrain(Loop):
    # auto: from the training split's rows (stages/tabular/budget.py)
    epochs: Positive | Literal["auto"]
    batch_size: Positive | Literal["auto"]
    hidden: list[Positive]  # [] = a linear model
    dropout: Annotated[float, Field(ge=0, lt=1)]
    embedding: Count  # periodic numeric embeddings per number (rtdl-num-embeddings); 0 = off
    ensemble: Positive  # TabM-style weight-sharing members (tabm); 1 = one network
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    monitor: Literal["val_loss", "val_acc", "val_mae"]


class TabularEvaluate(Section):
    baseline: bool
    fail_if_untrained: bool
    cv_below: Count  # tables with fewer rows also get K-fold CV metrics; 0 = off
    cv_folds: Annotated[int, Field(ge=2)]
    alpha: Fraction  # conformal miscoverage (stages/core/trust.py)
    ood_threshold: Fraction  # OOD p-value at or below which a row is flagged
    importance_repeats: Positive  # permutation importance: shuffles per column


class TabularBoost(Section):
    """The boost stage (stages/tabular/boost.py): HistGradientBoosting and the weights."""

    models: Literal["ensemble", "network", "boosting"]  # what is served
    max_iter: Positive
    learning_rate: Annotated[float, Field(gt=0)]
    max_leaf_nodes: Annotated[int, Field(ge=2)]
    patience: Positive  # early stopping on the validation split: iterations without gain
    rounds: Positive  # greedy ensemble selection's picks (weights are multiples of 1/rounds)


class TabularExport(Section):
    parity_atol: Annotated[float, Field(gt=0)]
    torchscript: bool
    background_rows: Positive  # explanations: training rows in the card
    exact_columns: Annotated[int, Field(ge=0, le=16)]  # exact Shapley up to this many columns
    permutations: Annotated[
        int, Field(ge=2)
    ]  # samples (order, background row) beyond exact_columns


class TabularInfer(Section):
    source: str
    batch_size: Positive
    output: str
    explain: bool  # also write attr_<column> columns


class Tabular(Section):
    data: TabularData
    validate_: TabularValidate = Field(alias="validate")  # BaseModel has .validate
    train: TabularTrain
    boost: TabularBoost
    labels: TabularLabels
    evaluate: TabularEvaluate
    export: TabularExport
    infer: TabularInfer


# ---- image ----


class ImageDemo(Section):
    size: Annotated[int, Field(ge=8)]


class ImageData(Section):
    source: str
    image_size: Positive
    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]
    duplicates: Duplicates
    split: Split
    exclude: list[str]  # image paths relative to the source


class ImageLabels(Section):
    """The labels stage: K-fold, and each fold's CNN (no augmentation)."""

    folds: Annotated[int, Field(ge=2)]
    epochs: Positive
    arch: Arch
    batch_size: Positive
    lr: Annotated[float, Field(gt=0)]


class ImageValidate(Section):
    modes: Annotated[list[str], Field(min_length=1)]
    min_size: Positive
    max_size: Positive
    min_per_class: Positive


class Augment(Section):
    rotate: Annotated[float, Field(ge=0, le=180)]
    translate: Annotated[float, Field(ge=0, lt=1)]
    scale: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)]
    hflip: bool


class ImageTrain(Loop):
    arch: Arch
    pretrained: bool | str  # false | true (torchvision weights) | a .pth path
    augment: Augment
    monitor: Literal["val_loss", "val_acc"]


class ImageEvaluate(Section):
    worst: Count
    fail_if_untrained: bool
    alpha: Fraction
    ood_threshold: Fraction


class ImageExport(Section):
    parity_atol: Annotated[float, Field(gt=0)]
    min_top1_agreement: Share


class ImageInfer(Section):
    source: str
    batch_size: Positive
    top_k: Positive
    heatmaps: bool  # also write class activation maps (layout.HEATMAPS)


class Image(Section):
    demo: ImageDemo
    data: ImageData
    validate_: ImageValidate = Field(alias="validate")  # BaseModel has .validate
    train: ImageTrain
    labels: ImageLabels
    evaluate: ImageEvaluate
    export: ImageExport
    infer: ImageInfer


# ---- detect ----


class DetectDemo(Section):
    images: Positive
    size: Annotated[int, Field(ge=16)]
    seed: int


class DetectData(Section):
    source: str
    format: BoxFormat
    images: str
    split: Split


class DetectValidate(Section):
    min_size: Positive
    max_size: Positive
    min_labelled: Share


class DetectTrain(Section):
    model: str
    imgsz: Annotated[int, Field(ge=32)]
    epochs: Positive
    batch: Positive
    optimizer: Literal["auto", "SGD", "AdamW"]
    lr0: Annotated[float, Field(gt=0)]
    patience: Count
    device: str | Count  # auto | cpu | 0 | "0,1"
    workers: Count
    amp: bool


class DetectEvaluate(Section):
    conf: Share
    iou: Share
    coco_tolerance: Annotated[float, Field(ge=0)]
    min_map50: Share
    fail_if_untrained: bool


class DetectExport(Section):
    graph: Graph
    conf: Share  # also the model card's postprocessing.conf: what infer and serving use
    iou: Share
    match_iou: Share
    min_matched: Share


class DetectInfer(Section):
    source: str
    batch_size: Positive
    render: Count


class Detect(Section):
    demo: DetectDemo
    data: DetectData
    validate_: DetectValidate = Field(alias="validate")  # BaseModel has .validate
    train: DetectTrain
    evaluate: DetectEvaluate
    export: DetectExport
    infer: DetectInfer


# ---- tools and serving ----


class Tune(Section):
    trial: str


class Registry(Section):
    tolerance: Annotated[float, Field(ge=0)]
    max_latency_ratio: Annotated[float, Field(gt=0)]


class Canary(Section):
    """A candidate served beside one task's model: a folder or a registry version."""

    task: Literal["tabular", "image", "detect"]
    path: str
    version: str
    share: Share


class Serve(Section):
    model: str
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    max_upload_mb: Annotated[float, Field(gt=0)]
    max_pixels: Positive
    max_rows: Positive
    explain_max_rows: Positive  # explained rows cost 2^M x background (or samples x M) model rows
    cors_origins: list[str]
    workers: Positive
    concurrency: Positive
    queue_timeout_s: Annotated[float, Field(gt=0)]
    strict: bool
    drift_window: Positive
    drift_threshold: Annotated[float, Field(gt=0)]  # PSI; the InputDrift alert's level
    request_log_dir: str
    request_log_sample: Share
    request_log_mb: Annotated[float, Field(gt=0)]
    request_log_backups: Count
    gradio_cache_s: Positive
    model_root: str  # load requests' paths resolve inside it ("" = the working directory)
    reload_s: Annotated[float, Field(ge=0)]  # follow serve.model's stage; 0 = off
    canary: Canary
    shadow: bool


class Params(Section):
    seed: int
    reproducible: bool = True  # stages/core/numerics.py
    tabular: Tabular
    image: Image
    detect: Detect
    tune: Tune
    registry: Registry
    serve: Serve


# ---- checking ----


def plain(section: Section) -> dict:
    """A section as params.yaml spells it (`validate`, not `validate_`; its key order; 10, not
    10.0), JSON-ready: what a fingerprint hashes and what a log or a model card records."""
    return section.dump()


def _fields(model: type[BaseModel]) -> dict:
    """A section's fields by their params.yaml name (the alias where a name is taken)."""
    return {f.alias or name: f for name, f in model.model_fields.items()}


def keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key the schema defines, sections included (tabular, tabular.train, ...)."""
    out = []
    for name, field in _fields(model).items():
        dotted = f"{prefix}{name}"
        out.append(dotted)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += keys(sub, dotted + ".")
    return out


def leaf_keys() -> list[str]:
    """The dotted keys that hold values (what docs/params.md documents)."""
    every = keys()
    return [k for k in every if not any(o.startswith(k + ".") for o in every)]


def _dotted(loc: tuple) -> str:
    """The params key of a pydantic error location: field names walked down the schema;
    list indices become [i]; union-member tags (e.g. 'bool', 'str') are dropped."""
    model: type[BaseModel] | None = Params
    parts: list[str] = []
    for item in loc:
        if model is not None and item in _fields(model):
            parts.append(item)
            sub = _fields(model)[item].annotation
            model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        elif model is not None:  # an unknown key (YAML allows 1: as a key): the last item
            parts.append(str(item))
            model = None
        elif isinstance(item, int) and parts:  # inside a list
            parts[-1] += f"[{item}]"
    return ".".join(parts)


def nearest(key: str) -> str | None:
    """The schema's key closest to a misspelt one (not one of its own sections)."""
    others = [k for k in keys() if not key.startswith(k + ".")]
    near = difflib.get_close_matches(key, others, n=1, cutoff=0.6)
    return near[0] if near else None


def _problem(key: str, errors: list[dict]) -> str:
    kind = errors[0]["type"]
    if kind == "extra_forbidden":
        near = nearest(key)
        return "unknown key" + (f" (did you mean {near}?)" if near else "")
    if kind == "missing":
        return "missing"
    wanted = " or ".join(dict.fromkeys(e["msg"][0].lower() + e["msg"][1:] for e in errors))
    return f"{wanted} (it is {errors[0]['input']!r})"


def overridden(params: Params | dict, values: dict) -> dict:
    """A copy of params (as params.yaml holds them) with dotted keys set
    ({"tabular.train.lr": 0.01}), as `dvc exp run -S` sets them: what a sweep or tune trial
    will run with, to validate before queueing it."""
    out = plain(params) if isinstance(params, Section) else copy.deepcopy(params)
    for dotted, value in values.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        node[leaf] = value
    return out


def replaced(params: Params, values: dict) -> Params:
    """params with dotted keys set (as overridden), checked again: what a tool or a test
    runs a stage with."""
    return validate(overridden(params, values))


def validate(params: dict) -> Params:
    """params (as read from params.yaml) as the typed, frozen Params model, or StageError with
    one line naming the first bad key."""
    if not isinstance(params, dict):
        raise StageError("params.yaml: expected a mapping of sections (seed, tabular, ...)")
    try:
        return Params.model_validate(params)
    except ValidationError as e:
        by_key: dict[str, list[dict]] = {}
        for err in e.errors(include_url=False):
            by_key.setdefault(_dotted(err["loc"]), []).append(err)
        # A misspelt key is also a missing one: name the unknown key, which says the fix.
        key, errors = min(by_key.items(), key=lambda kv: kv[1][0]["type"] != "extra_forbidden")
        # The key a misspelling replaced is missing too: one problem, not two.
        near = nearest(key) if errors[0]["type"] == "extra_forbidden" else None
        more = len([k for k in by_key if k not in (key, near)])
        more = f" (and {more} more)" if more else ""
        raise StageError(f"params.yaml: {key}: {_problem(key, errors)}{more}") from None
