"""The six benchmark sections, one function each. Every function takes `quick` (tiny sizes,
for the test that keeps this code from rotting) and a scratch folder, and returns
{"rows": [Row], "notes": [str], "details": {...}}.

All of them run from the repository root (bench/__main__.py changes into it) and only
read what is there: the trained models in models/, data/prepared/, the suites in
data/expectations/. Whatever they write goes to the scratch folder.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.files import read_json
from stages.core.inference import open_session, physical_cores
from stages.core.params import load_params
from tools.bench.timing import Row, alternate, median, percentile, ratio_row

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is tools/bench/...)


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def model_inputs(task: str, n: int) -> np.ndarray:
    """Up to n preprocessed test inputs of a task, as the exported model takes them."""
    from stages.detect.boxes import load_for_detection
    from stages.image.data import preprocess
    from stages.tabular.data import Preprocessor

    card = read_json(f"models/{task}/model.json")
    if task == "tabular":
        df = pd.read_parquet("data/prepared/tabular/test.parquet").head(n)
        return Preprocessor.from_dict(card["preprocessing"]).transform(df)
    if task == "image":
        paths = pd.read_csv("data/prepared/image/test.csv")["path"].head(n)
        return preprocess([Path("data/prepared/image") / p for p in paths], card["preprocessing"])
    files = sorted(Path("data/prepared/detect/images/test").iterdir())[:n]
    return np.stack([load_for_detection(f, card["preprocessing"]["imgsz"])[0] for f in files])


def torch_model(task: str):
    """The torch model behind each export, in eval mode: ours, or Ultralytics' (fused)."""
    if task != "detect":
        import importlib

        from stages.core.onnx_export import load_model

        return load_model(
            f"models/{task}/model.pt", importlib.import_module(f"stages.{task}.model").build_model
        )[0]
    from stages.detect import yolo

    yolo.configure()  # before importing ultralytics
    from ultralytics.nn.tasks import load_checkpoint

    model = load_checkpoint("models/detect/model.pt")[0]
    return model.fuse(verbose=False).eval()


# ------------------------------------------------------------------ 1. inference
def inference(quick: bool, scratch: Path) -> dict:
    """onnxruntime vs torch eager on the same inputs, batch 1 and 64, same thread count;
    then the session options against each other (threads, spinning)."""
    import torch

    threads = physical_cores()
    torch.set_num_threads(threads)
    rounds = 2 if quick else 15
    rows, notes, details = [], [], {"threads": threads}
    big = 8 if quick else 64
    for task in ("tabular", "image", "detect"):
        xs = model_inputs(task, big)  # the test splits have at least 64 rows / images
        model = torch_model(task)
        sessions = {
            "default": open_session(f"models/{task}/model.onnx"),
            "no spinning": open_session(f"models/{task}/model.onnx", spinning=False),
            "1 thread": open_session(f"models/{task}/model.onnx", threads=1),
        }
        name = sessions["default"].get_inputs()[0].name
        for batch in (1, big):
            x = xs[:batch]
            xt = torch.from_numpy(x)

            def eager(xt=xt):
                with torch.inference_mode():
                    model(xt)

            contenders = {
                f"onnxruntime {k}": (lambda s=s, x=x: s.run(None, {name: x}))
                for k, s in sessions.items()
            }
            times = alternate(
                {**contenders, "torch": eager},
                rounds,
                number=None,
                sample_s=0.01 if quick else 0.05,
                max_s=6,
            )
            rate = {k: batch / median(v) for k, v in times.items()}
            details[f"{task}_b{batch}_items_per_s"] = rate
            target = 1.5 if task != "tabular" and batch == 1 else None
            rows.append(
                ratio_row(
                    f"{task} batch {batch}",
                    ("onnxruntime", rate["onnxruntime default"], "items/s"),
                    ("torch", rate["torch"], "items/s"),
                    target,
                )
            )
            for k in ("no spinning", "1 thread"):
                rows.append(
                    ratio_row(
                        f"  session: {k} vs default ({threads} threads, spinning)",
                        (k, rate[f"onnxruntime {k}"], "items/s"),
                        ("default", rate["onnxruntime default"], "items/s"),
                    )
                )
    notes.append(
        f"torch.set_num_threads({threads}) = onnxruntime intra-op threads = physical cores; "
        "torch eager under torch.inference_mode; detect: Ultralytics DetectionModel, fused"
    )
    return {"rows": rows, "notes": notes, "details": details}


# ------------------------------------------------------------------ 2. serving
def start_server(scratch: Path) -> tuple[subprocess.Popen, str]:
    """`python -m app.server` on a free port of 127.0.0.1, as tests/conftest.py starts it."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = scratch / "server.log"  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.server"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 (the server outlives this block)
        env={**os.environ, "APP_HOST": "127.0.0.1", "APP_PORT": str(port)},
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.3)


def serving(quick: bool, scratch: Path) -> dict:
    """p50/p99 through the HTTP server vs the same call in process vs the bare session.run."""
    import httpx

    from app.predict import load_models, predict_image, predict_tabular
    from app.server import serve_config
    from stages.image.data import preprocess, split_images
    from stages.tabular.data import Preprocessor, type_features

    cfg = serve_config()
    models, missing = load_models("models", cfg)  # the server's own loader: same session options
    if {"tabular", "image"} - set(models):
        raise RuntimeError(f"models missing: {missing}")
    tab, img = models["tabular"], models["image"]
    row = json.loads(
        pd.read_parquet("data/prepared/tabular/test.parquet")
        .drop(columns=tab.card["target"])
        .head(1)
        .to_json(orient="records")
    )
    x_row = Preprocessor.from_dict(tab.card["preprocessing"]).transform(
        type_features(pd.DataFrame(row), tab.card["features"], "request")
    )
    digit = split_images(read_json("data/prepared/image/schema.json"))[0][0].read_bytes()
    x_img = preprocess([io.BytesIO(digit)], img.card["preprocessing"])
    k = min(cfg["top_k"], len(img.card["classes"]))
    n = 20 if quick else 300
    rows, details = [], {"requests_per_contender": n}
    proc, url = start_server(scratch)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:  # one keep-alive connection

            def post_tabular():
                r = client.post("/predict/tabular", json={"rows": row})
                r.raise_for_status()
                return r.json()["predictions"]

            def post_image():
                r = client.post(
                    f"/predict/image?top_k={k}", files={"file": ("digit.png", digit, "image/png")}
                )
                r.raise_for_status()
                return r.json()

            same = (
                post_tabular() == predict_tabular(tab, row),
                post_image() == predict_image(img, digit, k, cfg["max_pixels"]),
            )
            sname, iname = tab.session.get_inputs()[0].name, img.session.get_inputs()[0].name
            cases = {
                "tabular": {
                    "server": post_tabular,
                    "in-process": lambda: predict_tabular(tab, row),
                    "session.run": lambda: tab.session.run(None, {sname: x_row}),
                },
                "image": {
                    "server": post_image,
                    "in-process": lambda: predict_image(img, digit, k, cfg["max_pixels"]),
                    "session.run": lambda: img.session.run(None, {iname: x_img}),
                },
            }
            for task, contenders in cases.items():
                times = alternate(contenders, n, warmup=10)
                ms = {
                    c: {"p50": percentile(v, 50) * 1e3, "p99": percentile(v, 99) * 1e3}
                    for c, v in times.items()
                }
                details[task] = ms
                for q in ("p50", "p99"):
                    added = ms["server"][q] - ms["in-process"][q]
                    rule = task == "tabular" and q == "p50"
                    rows.append(
                        Row(
                            f"{task} {q} latency",
                            ("server", ms["server"][q], "ms"),
                            ("in-process", ms["in-process"][q], "ms"),
                            ms["server"][q] / ms["in-process"][q],
                            "server adds <= 3 ms" if rule else f"server adds {added:.2f} ms",
                            added <= 3 if rule else None,
                            {"added_ms": added},
                        )
                    )
                ratio = ms["in-process"]["p50"] / ms["session.run"]["p50"]
                # The tabular fast path (stages/tabular/serving.py): numpy, no pandas per request.
                rows.append(
                    Row(
                        f"{task} p50 latency",
                        ("in-process", ms["in-process"]["p50"], "ms"),
                        ("session.run", ms["session.run"]["p50"], "ms"),
                        ratio,
                        "<= 10x" if task == "tabular" else "",
                        ratio <= 10 if task == "tabular" else None,
                    )
                )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    notes = [
        f"sequential requests over one keep-alive httpx connection, {n} per contender, interleaved with the "
        "in-process call (app.predict) and the bare session.run on the preprocessed input",
        "server and in-process answers identical: " + ("yes" if all(same) else f"NO {same}"),
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ------------------------------------------------------------------ 3. batch inference
def synthetic_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A CSV shaped like the penguins data: its own lines (NA cells included) drawn at random."""
    header, *lines = Path(load_params()["tabular"]["data"]["source"]).read_text().splitlines()
    lines = np.array(lines, dtype=object)
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:  # in blocks: 50M rows are 2 GB of text
        f.write(header + "\n")
        for start in range(0, rows, 1_000_000):
            f.write(
                "\n".join(lines[rng.integers(0, len(lines), min(1_000_000, rows - start))]) + "\n"
            )
    return path


def batch(quick: bool, scratch: Path) -> dict:
    """The infer stage's core end to end vs a bare loop with the same helpers and session."""
    from stages.core.expectations import for_inference, load_suite, run_suite
    from stages.core.images import list_images
    from stages.core.inference import run_batches, softmax
    from stages.image import infer as image_infer
    from stages.image.data import preprocess, top_k
    from stages.tabular import infer as tabular_infer
    from stages.tabular.data import Preprocessor, decode_outputs, read_features, scores

    params = load_params()
    n_rows = 2_000 if quick else 100_000
    work = scratch / "batch"  # infer writes metrics/<task>/infer.json under its working folder
    (work / "data").mkdir(parents=True)
    (work / "data" / "expectations").symlink_to(
        ROOT / "data" / "expectations"
    )  # the card names its suite so
    csv = synthetic_csv(work / "rows.csv", n_rows)
    params["tabular"]["infer"]["source"] = str(csv)
    params["image"]["infer"]["source"] = str(ROOT / params["image"]["infer"]["source"])
    tcard, icard = read_json("models/tabular/model.json"), read_json("models/image/model.json")
    # Without spinning, as infer_tabular's: the bare loops' sessions stay open between samples, and
    # spinning ones keep a core busy after each run, which took a third of that core from
    # whichever contender came next (infer_tabular, with its validation worker, 132 → 161 ms).
    tsession, isession = (
        open_session(ROOT / f"models/{t}/model.onnx", spinning=False) for t in ("tabular", "image")
    )
    pre, bs = (
        Preprocessor.from_dict(tcard["preprocessing"]),
        params["tabular"]["infer"]["batch_size"],
    )
    suite = for_inference(load_suite(ROOT / tcard["validation"]["suite_file"]))
    table, root = list_images(params["image"]["infer"]["source"], labelled=False)
    files = table["path"].tolist()
    ip = params["image"]["infer"]

    def read():
        return read_features(csv, tcard["features"]).drop(
            columns=[tcard["target"]], errors="ignore"
        )

    def bare_tabular():
        df = read()
        return decode_outputs(run_batches(tsession, pre.transform(df, str(csv)), bs), tcard)

    def bare_image():
        for i in range(0, len(files), ip["batch_size"]):
            x = preprocess(
                [root / f for f in files[i : i + ip["batch_size"]]], icard["preprocessing"]
            )
            top_k(
                softmax(run_batches(isession, x, ip["batch_size"]).astype("float64")),
                icard["classes"],
                ip["top_k"],
            )

    rounds = 2 if quick else 7
    rows, notes, details = [], [], {"tabular_rows": n_rows, "images": len(files)}
    with chdir(work):
        times = alternate(
            {
                "infer_tabular": lambda: tabular_infer.run(
                    params, ROOT / "models/tabular", work / "t.csv"
                ),
                "bare": bare_tabular,
                "infer_image": lambda: image_infer.run(
                    params, ROOT / "models/image", work / "i.csv"
                ),
                "bare image": bare_image,
            },
            rounds,
        )
        # Where infer_tabular's time goes: its steps, timed one by one with the same helpers.
        df = read()
        x = pre.transform(df)
        out = run_batches(tsession, x, bs)
        predicted = scores(out, tcard)
        steps = alternate(
            {
                "read + type the CSV": read,
                "GX validation": lambda: run_suite(suite, {"input": df}),
                "open the session": lambda: open_session(ROOT / "models/tabular/model.onnx"),
                "preprocess": lambda: pre.transform(df),
                "session.run": lambda: run_batches(tsession, x, bs),
                "scores (softmax)": lambda: scores(out, tcard),
                "write the CSV": lambda: write_predictions(
                    tabular_infer, tcard, predicted, df, work / "steps.csv"
                ),
                "write parquet": lambda: write_predictions(
                    tabular_infer, tcard, predicted, df, work / "steps.parquet"
                ),
            },
            rounds,
        )
    med = {k: median(v) for k, v in times.items()}
    rows.append(
        ratio_row(
            f"tabular, {n_rows:,} rows",
            ("infer_tabular", n_rows / med["infer_tabular"], "rows/s"),
            ("bare loop", n_rows / med["bare"], "rows/s"),
            0.8,
        )
    )
    rows.append(
        ratio_row(
            f"image, {len(files)} test images",
            ("infer_image", len(files) / med["infer_image"], "images/s"),
            ("bare loop", len(files) / med["bare image"], "images/s"),
            0.8,
        )
    )
    step_s = {k: median(v) for k, v in steps.items()}
    details["seconds"] = med
    details["infer_tabular_steps_s"] = step_s
    total = sum(step_s.values())
    notes.append(
        "both sides read and type the same CSV, preprocess and run with the same helpers and session "
        "options; the bare loop decodes into predict()'s table and skips GX validation and writing; "
        "infer_tabular writes the CSV from the scores"
    )
    notes.append(
        "infer_tabular, step by step: "
        + ", ".join(
            f"{k} {v * 1e3:.0f} ms ({v / total:.0%})"
            for k, v in sorted(step_s.items(), key=lambda kv: -kv[1])
        )
    )
    return {"rows": rows, "notes": notes, "details": details}


def write_predictions(
    tabular_infer, card: dict, predicted: np.ndarray, df: pd.DataFrame, path: Path
) -> None:
    writer = tabular_infer.Writer(path, card)
    writer.write(predicted, df.index.to_numpy())
    writer.close()


# ------------------------------------------------------------------ 4. training
def minimal_loop(model, train_set, val_set, cfg, amp: bool, seed: int) -> None:
    """What the shared trainer does, by hand: AdamW, autocast, clip, step; a validation pass per epoch."""
    import torch
    from torch.utils.data import DataLoader

    from stages.core.trainer import collate_of

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The dataset's own batch function (the image set augments and normalises whole batches).
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_of(train_set),
    )
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.batch_size * 2,
        num_workers=cfg.num_workers,
        collate_fn=collate_of(val_set),
    )
    for _ in range(cfg.epochs):
        model.train()
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            for x, _ in val_loader:
                model(x)


def training(quick: bool, scratch: Path) -> dict:
    """samples/s of stages.core.trainer.fit vs minimal_loop, AMP (bf16) on and off; the loader alone."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from stages.core.distributed import Runtime, cpu_supports_bf16
    from stages.core.trainer import LoopConfig, collate_of, fit
    from stages.image.train import job as image_job
    from stages.tabular.train import job as tabular_job
    from stages.tabular.train import resolved_params

    threads = physical_cores()
    torch.set_num_threads(threads)
    params = resolved_params(load_params())  # tabular.train's `auto` batch size and epochs
    rt = Runtime(0, 0, 1, torch.device("cpu"))
    amps = ["bf16", "off"] if cpu_supports_bf16() else ["off"]
    rows, notes, details = [], [], {"threads": threads}
    runs, epochs = 0, 1
    # (task, job, training samples, rounds): the penguins' 223 rows are drawn with replacement
    # up to a size worth timing; the digits are used as they are. One epoch per run.
    plan = (
        ("tabular", tabular_job, 256 if quick else 20_000, 1 if quick else 7),
        ("image", image_job, 64 if quick else None, 1 if quick else 3),
    )
    for task, make_job, size, rounds in plan:
        job = make_job(params)
        train_set, val_set = job.train_set, job.val_set
        if task == "tabular":
            # In memory on both sides (the loop's overhead is measured, not parquet reading): the
            # job's split, streamed or not, as tensors, resampled to `size` rows.
            if not isinstance(train_set, TensorDataset):
                train_set = TensorDataset(
                    *map(torch.cat, zip(*train_set, strict=False))
                )  # the stream's batches
            idx = torch.from_numpy(np.random.default_rng(0).integers(0, len(train_set), size))
            train_set = TensorDataset(*(t[idx] for t in train_set.tensors))
        elif size:
            train_set, val_set = (
                torch.utils.data.Subset(d, range(size)) for d in (train_set, val_set)
            )
        pristine = copy.deepcopy(job.model)
        base = {
            **params[task]["train"],
            "epochs": epochs,
            "patience": 0,
            "device": "cpu",
            "nproc": 1,
        }

        def fresh():
            return copy.deepcopy(pristine)

        def run_fit(amp, data=(train_set, val_set)):
            nonlocal runs
            runs += 1
            cfg = LoopConfig.from_params({**base, "amp": amp}, f"{task}.train")
            with contextlib.redirect_stderr(io.StringIO()):  # fit logs a line per epoch
                fit(
                    fresh(),
                    *data,
                    sums_fn=job.sums_fn,
                    cfg=cfg,
                    rt=rt,
                    seed=params["seed"],
                    ckpt_dir=scratch / f"ckpt-{task}-{runs}",
                    fingerprint=f"bench-{runs}",
                )
            shutil.rmtree(scratch / f"ckpt-{task}-{runs}", ignore_errors=True)

        def run_min(amp, data=(train_set, val_set)):
            cfg = LoopConfig.from_params({**base, "amp": amp}, f"{task}.train")
            minimal_loop(fresh(), *data, cfg, amp != "off", params["seed"])

        def loader_alone():  # what fit's loader does: batches, augmented and normalised (image)
            for _ in DataLoader(
                train_set,
                batch_size=base["batch_size"],
                shuffle=True,
                num_workers=base["num_workers"],
                collate_fn=collate_of(train_set),
            ):
                pass

        contenders = {}
        for amp in amps:
            contenders[f"fit amp={amp}"] = lambda amp=amp: run_fit(amp)
            contenders[f"minimal amp={amp}"] = lambda amp=amp: run_min(amp)
        contenders["loader alone"] = loader_alone
        if not quick:  # warm-up (first-call costs of each path) on a few batches
            few = tuple(
                torch.utils.data.Subset(d, range(min(len(d), 2 * base["batch_size"])))
                for d in (train_set, val_set)
            )
            for amp in amps:
                run_fit(amp, few)
                run_min(amp, few)
        # On a busy machine torch's threads wait for each other at every op and a run takes
        # ten times longer: then fewer rounds, so the bench stays within its 10 minutes.
        times = alternate(
            contenders, rounds, warmup=0, max_s=20 if task == "tabular" else 40, min_rounds=2
        )
        med = {k: median(v) for k, v in times.items()}
        samples = epochs * len(train_set)
        details[task] = {"train_samples": len(train_set), "epochs": epochs, "seconds": med}
        for amp in amps:
            rows.append(
                ratio_row(
                    f"{task} training, amp {amp}",
                    ("fit", samples / med[f"fit amp={amp}"], "samples/s"),
                    ("minimal loop", samples / med[f"minimal amp={amp}"], "samples/s"),
                    0.95,
                )
            )
        if len(amps) == 2:
            rows.append(
                ratio_row(
                    f"{task} fit, bf16 vs fp32",
                    ("bf16", samples / med["fit amp=bf16"], "samples/s"),
                    ("fp32", samples / med["fit amp=off"], "samples/s"),
                )
            )
        steps = epochs * -(-len(train_set) // base["batch_size"])
        extra = {
            amp: (med[f"fit amp={amp}"] - med[f"minimal amp={amp}"]) / steps * 1e6 for amp in amps
        }
        notes.append(
            f"{task}: fit takes {', '.join(f'{v:+.0f} us (amp {a})' for a, v in extra.items())} per step "
            f"more than the minimal loop, on steps of {med['minimal amp=off'] / steps * 1e3:.2f} ms (fp32)"
        )
        epoch_s = med[f"fit amp={amps[0]}"] / epochs
        share = med["loader alone"] / epoch_s
        rows.append(
            Row(
                f"{task} DataLoader alone vs a fit epoch",
                ("loader", med["loader alone"], "s"),
                ("epoch", epoch_s, "s"),
                share,
                "loader <= 0.5x",
                share <= 0.5,
            )
        )
    notes.append(
        "same model and initial weights, data, batch size, AdamW, grad clipping and threads on both sides; "
        "both also score the validation split each epoch; fit also writes its checkpoints"
    )
    if len(amps) == 1:
        notes.append("this CPU has no native bf16: AMP rows skipped")
    return {"rows": rows, "notes": notes, "details": details}


# ------------------------------------------------------------------ 5. validation and ingestion
# A small parent for the measured process: a child forked straight from this (large) process
# starts with this process's resident size in its peak-memory record on Linux.
PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)"
)


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run a command; (wall seconds, its peak resident memory in MiB)."""
    peak = cwd / ".peak_rss"
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(peak), *cmd],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - start
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-2000:]}")
    return seconds, int(peak.read_text()) / 1024


def copy_repo(dst: Path) -> Path:
    """The files git tracks (and untracked, unignored ones), as tests/conftest.py copies them."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        if Path(rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(rel, dst / rel)
    return dst


def validation(quick: bool, scratch: Path) -> dict:
    """The tabular GX suite on a large table (with and without Data Docs); prepare and
    validate as processes on a very large CSV, with their peak memory."""
    import cProfile
    import pstats

    import yaml

    from stages.core.expectations import load_suite, run_suite

    n = 20_000 if quick else 1_000_000
    train = pd.read_parquet("data/prepared/tabular/train.parquet")
    big = train.iloc[np.random.default_rng(0).integers(0, len(train), n)].reset_index(drop=True)
    big.index = pd.RangeIndex(2, 2 + n, name="line")
    suite = load_suite("data/expectations/tabular/penguins.json")
    docs = itertools.count()
    run_suite(
        suite, {"train": big.head(100)}, scratch / "docs"
    )  # warm-up: GX's imports and first-use costs
    times = alternate(
        {
            "run_suite": lambda: run_suite(suite, {"train": big}),
            "with Data Docs": lambda: run_suite(
                suite, {"train": big}, scratch / f"docs{next(docs)}"
            ),
        },
        1 if quick else 3,
        warmup=0,
    )
    rate = {k: n / median(v) for k, v in times.items()}
    rows = [
        ratio_row(
            f"GX tabular suite, {n:,} rows",
            ("run_suite", rate["run_suite"], "rows/s"),
            ("with Data Docs", rate["with Data Docs"], "rows/s"),
        )
    ]
    rows.append(
        ratio_row(
            "GX suite vs the 1M rows/s target",
            ("run_suite", rate["run_suite"], "rows/s"),
            ("target", 1e6, "rows/s"),
            1.0,
        )
    )
    notes, details = [], {"gx_rows": n, "gx_rows_per_s": rate}
    # Where GX spends it: the functions with the most time of their own.
    prof = cProfile.Profile()
    prof.runcall(run_suite, suite, {"train": big})
    stats = pstats.Stats(prof)
    total = stats.total_tt
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:6]
    details["gx_profile_top"] = [
        {"function": f"{Path(f).name}:{line}({fn})", "seconds": round(tt, 3)}
        for (f, line, fn), (_, _, tt, _, _) in top
    ]
    notes.append(
        f"GX time by function (own time, of {total:.2f} s): "
        + ", ".join(
            f"{Path(f).parent.name}/{Path(f).name}:{fn} {tt / total:.0%}"
            for (f, _, fn), (_, _, tt, _, _) in top
        )
    )

    # prepare + validate on a very large CSV, in a copy of the repo, as the pipeline runs them
    n_csv = 50_000 if quick else 5_000_000
    repo = copy_repo(scratch / "repo")
    csv = synthetic_csv(
        scratch / "big" / "penguins.csv", n_csv
    )  # the name picks the committed suite
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["tabular"]["data"]["source"] = str(csv)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    prep_s, prep_mb = run_measured([sys.executable, "-m", "stages", "prepare", "tabular"], repo)
    val_s, val_mb = run_measured([sys.executable, "-m", "stages", "validate", "tabular"], repo)
    size_mb = csv.stat().st_size / 2**20
    rows.append(
        Row(
            f"prepare vs validate, {n_csv:,}-row CSV ({size_mb:.0f} MiB)",
            ("prepare", prep_s, "s"),
            ("validate", val_s, "s"),
            prep_s / val_s,
            extra={"rows_per_s": {"prepare": n_csv / prep_s, "validate": n_csv / val_s}},
        )
    )
    rows.append(
        Row(
            "  peak memory (RSS)",
            ("prepare", prep_mb, "MiB"),
            ("validate", val_mb, "MiB"),
            prep_mb / val_mb,
            extra={"csv_mib": size_mb},
        )
    )
    details.update(
        csv_rows=n_csv,
        csv_mib=size_mb,
        prepare_s=prep_s,
        validate_s=val_s,
        prepare_peak_mib=prep_mb,
        validate_peak_mib=val_mb,
    )
    rows.append(
        ratio_row(
            "prepare vs the 1M rows/s target",
            ("prepare", n_csv / prep_s, "rows/s"),
            ("target", 1e6, "rows/s"),
            1.0,
        )
    )
    rows.append(
        Row(
            "prepare's peak memory vs 3x the CSV",
            ("prepare", prep_mb, "MiB"),
            ("3x CSV", 3 * size_mb, "MiB"),
            prep_mb / (3 * size_mb),
            "<= 1",
            prep_mb <= 3 * size_mb,
        )
    )
    notes.append(
        f"prepare {n_csv / prep_s:,.0f} rows/s, peak {prep_mb / size_mb:.1f}x the CSV's size; "
        f"validate (3 splits, Data Docs) {n_csv / val_s:,.0f} rows/s"
    )
    return {"rows": rows, "notes": notes, "details": details}


# ------------------------------------------------------------------ 5b. data bigger than memory
def large(quick: bool, scratch: Path) -> dict:
    """A 50,000,000-row CSV (about 2 GB) through prepare → validate → train (one epoch) →
    evaluate → export → infer (of the same CSV), each stage a process in a copy of the repo,
    with its time and peak memory. Not in the default sections (`--only large`): it takes tens of minutes on 2 cores."""
    import yaml

    n = 50_000 if quick else 50_000_000
    repo = copy_repo(scratch / "repo")
    csv = synthetic_csv(scratch / "big" / "penguins.csv", n)  # the name picks the committed suite
    size_mb = csv.stat().st_size / 2**20
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["tabular"]["data"]["source"] = p["tabular"]["infer"]["source"] = str(
        csv
    )  # infer: all 50M rows again
    # One epoch in large batches: the loop's speed is the training section's subject, not this one's.
    p["tabular"]["train"].update(epochs=1, batch_size=4096, patience=0, nproc=1)
    p["tabular"]["evaluate"]["baseline"] = (
        False  # HistGradientBoosting on 35M rows in memory: not this chain's subject
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    rows, details = [], {"csv_rows": n, "csv_mib": round(size_mb), "stages": {}}
    for stage in ("prepare", "validate", "train", "evaluate", "export", "infer"):
        seconds, peak = run_measured([sys.executable, "-m", "stages", stage, "tabular"], repo)
        details["stages"][stage] = {
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak),
            "rows_per_s": round(n / seconds),
        }
        rows.append(
            Row(
                f"{stage}, {n:,}-row CSV ({size_mb:,.0f} MiB)",
                (stage, seconds, "s"),
                ("peak RSS", peak, "MiB"),
                peak / size_mb,
                extra={"rows_per_s": n / seconds},
            )
        )
    notes = [
        f"{stage}: {d['seconds']} s, peak {d['peak_rss_mib']} MiB ({d['peak_rss_mib'] / size_mb:.2f}x the CSV)"
        for stage, d in details["stages"].items()
    ]
    return {"rows": rows, "notes": notes, "details": details}


# ------------------------------------------------------------------ 6. pipeline overhead
def pipeline(quick: bool, scratch: Path) -> dict:
    """`dvc repro` with nothing to do, and `dvc status`, in this repository (read-only)."""
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    class Busy(Exception):
        """Another dvc command (a `dvc repro` someone runs here) holds the repository's lock."""

    def run(*args, tries=10):
        for _ in range(tries):  # wait a little for another dvc command to let go of its lock
            res = subprocess.run([dvc, *args], capture_output=True, text=True, env=env)
            if res.returncode == 0 or "is busy" not in res.stderr:
                break
            time.sleep(3)
        if res.returncode:
            raise (Busy if "is busy" in res.stderr else subprocess.SubprocessError)(
                f"dvc {' '.join(args)}: {res.stderr.strip()[-500:]}"
            )
        return res.stdout

    def changed() -> list[str]:
        return sorted(json.loads(run("status", "--json") or "{}"))

    def check(name):  # before every `dvc repro`: never reproduce a pipeline that is not up to date
        if name == "repro" and changed():
            raise RuntimeError("the pipeline changed during the bench")

    try:
        stale, notes = changed(), []
    except Busy as e:
        return {
            "rows": [],
            "notes": [f"not measured: the repository is busy ({str(e).splitlines()[0]})"],
            "details": {"busy": True},
        }
    rounds, warmup = (1, 0) if quick else (5, 1)
    try:
        if stale:
            raise RuntimeError(
                f"`dvc status` lists {len(stale)} changed stages ({', '.join(stale)})"
            )
        times = alternate(
            {"repro": lambda: run("repro"), "status": lambda: run("status")},
            rounds,
            warmup=warmup,
            before=check,
        )
        what, cmd = "dvc repro, nothing changed", "dvc repro"
    except RuntimeError as e:  # time what `dvc repro` checks without letting it run anything
        notes.append(f"{e}: timed `dvc repro --dry` instead, so that nothing is rerun here")
        times = alternate(
            {"repro": lambda: run("repro", "--dry"), "status": lambda: run("status")},
            rounds,
            warmup=warmup,
        )
        what, cmd = "dvc repro --dry (pipeline not up to date)", "dvc repro --dry"
    med = {k: median(v) for k, v in times.items()}
    rows = [
        Row(
            what,
            (cmd, med["repro"], "s"),
            ("dvc status", med["status"], "s"),
            med["repro"] / med["status"],
            "repro <= 1.5 s",
            med["repro"] <= 1.5 if cmd == "dvc repro" else None,
        )
    ]
    return {
        "rows": rows,
        "notes": notes,
        "details": {"seconds": med, "up_to_date": not stale, "changed_stages": stale},
    }


SECTIONS = {
    "inference": inference,
    "serving": serving,
    "batch": batch,
    "training": training,
    "validation": validation,
    "pipeline": pipeline,
    "large": large,
}
OPT_IN = {"large"}  # run only when named in --only
