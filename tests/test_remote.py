"""Data versioning round trips: push every cached output to a DVC remote, lose the cache and
the workspace copies, pull, and get the same bytes back with `dvc status` clean.

Both tests start from a copy of `served_repo` (all three tasks reproduced on tiny params;
shared with the app tests, so `make test` reproduces it once). One goes through the
committed default remote (a folder in the clone) with `make push` / `make pull`, the other
through a real S3 API (moto's server on 127.0.0.1) with the DVC CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, run, stop

pytestmark = pytest.mark.slow

# Every output DVC caches (the rest are `cache: false` metrics kept in git).
CACHED = {
    "data/demo/digits",
    "data/demo/shapes",
    *(f"data/prepared/{t}" for t in ("tabular", "image", "detect")),
    *(
        f"models/{t}/{f}"
        for t in ("tabular", "image", "detect")
        for f in ("model.pt", "model.onnx", "model.json")
    ),
    "models/tabular/boosting.joblib",  # boost@tabular's model and served weights
    "models/tabular/ensemble.json",
    "data/predictions/tabular.csv",
    "data/predictions/image.csv",
    "data/predictions/detect.json",
}
CLEAN = "Data and pipelines are up to date"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_object(root: Path, digest: str) -> Path:
    """Where DVC 3 keeps an object, in the cache and in a remote alike: files/md5/ab/cdef…"""
    return root / "files" / "md5" / digest[:2] / digest[2:]


def lock_outs(repo: Path) -> dict[str, dict]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out for stage in lock["stages"].values() for out in stage.get("outs", [])}


def snapshot(repo: Path, rels) -> dict[str, dict[str, str]]:
    """{output: {file relative to the output: md5 of its bytes}}"""
    snap = {}
    for rel in rels:
        path = repo / rel
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        snap[rel] = {p.relative_to(path).as_posix(): md5(p) for p in files}
    return snap


def expected_objects(repo: Path) -> set[str]:
    """The objects (relative to a cache or remote root) every cached output in dvc.lock needs.

    A directory output is its .dir manifest plus one object per file listed in it."""
    objects = set()
    cache = repo / ".dvc" / "cache"
    for rel, out in lock_outs(repo).items():
        if rel not in CACHED:
            continue
        objects.add(cache_object(Path(), out["md5"]).as_posix())
        if out["md5"].endswith(".dir"):
            manifest = json.loads(cache_object(cache, out["md5"]).read_text())
            objects |= {cache_object(Path(), entry["md5"]).as_posix() for entry in manifest}
    return objects


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def check_against_lock(repo: Path, snap: dict) -> None:
    """Every cached output's content hashes to what dvc.lock says."""
    outs = lock_outs(repo)
    for rel, files in snap.items():
        digest = outs[rel]["md5"]
        if digest.endswith(".dir"):
            manifest = json.loads(cache_object(repo / ".dvc" / "cache", digest).read_text())
            assert {e["relpath"]: e["md5"] for e in manifest} == files, rel
            assert outs[rel]["nfiles"] == len(files), rel
        else:
            assert files == {".": digest}, rel


def wipe(repo: Path) -> None:
    """Lose the cache (and DVC's hash/index state) and every cached output in the workspace."""
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)
    for rel in CACHED:
        path = repo / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    status = run(repo, "dvc", "status").stdout
    assert CLEAN not in status and "deleted" in status


@pytest.fixture
def copy(served_repo, tmp_path) -> Path:
    """A private copy of the reproduced repo (cache, outputs, git) to break."""
    dst = tmp_path / "repo"
    shutil.copytree(served_repo, dst, symlinks=True, ignore=shutil.ignore_patterns(".cache"))
    assert CLEAN in run(dst, "dvc", "status").stdout
    return dst


def prepare(repo: Path):
    """The cached outputs, their hashes, and the objects a push must send."""
    outs = lock_outs(repo)
    cached = {
        rel
        for rel, out in outs.items()
        if cache_object(repo / ".dvc" / "cache", out["md5"]).is_file()
    }
    assert cached == CACHED  # exactly the outputs we expect DVC to cache, all in the cache
    snap = snapshot(repo, CACHED)
    check_against_lock(repo, snap)
    objects = expected_objects(repo)
    # ... and nothing else in the cache's object store (runs/, the run cache, is not pushed)
    assert objects == {p for p in files_under(repo / ".dvc" / "cache") if p.startswith("files/")}
    return snap, objects


def test_round_trip_through_the_default_local_remote(copy):
    snap, objects = prepare(copy)
    storage = copy / ".dvc-storage"
    remotes = run(copy, "dvc", "remote", "list").stdout
    assert remotes.split() == ["local", str(storage), "(default)"], (
        remotes
    )  # inside the clone, wherever it is

    # `make` with `-o install`: the copy has no .venv of its own and must not make one.
    out = run(copy, "make", "-o", "install", "push").stdout
    assert f"{len(objects)} files pushed" in out, out
    assert files_under(storage) == objects
    # The remote lives in the clone but is neither git's nor DVC's business.
    assert run(copy, "git", "check-ignore", ".dvc-storage").returncode == 0
    assert ".dvc-storage" not in run(copy, "git", "status", "--porcelain", "--ignored=no").stdout
    assert run(copy, "dvc", "check-ignore", ".dvc-storage").stdout.strip() == ".dvc-storage"

    wipe(copy)
    out = run(copy, "make", "-o", "install", "pull").stdout
    assert f"{len(objects)} files fetched" in out, out
    assert CLEAN in run(copy, "dvc", "status").stdout
    assert snapshot(copy, CACHED) == snap
    check_against_lock(copy, snap)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto's S3 server on a free port of 127.0.0.1 with an empty bucket; yields its URL."""
    import boto3

    # Nothing from this machine's AWS setup: the repo's config is the only source of credentials.
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    port = free_port()
    log = tmp_path / "moto.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto's server did not start: {log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket="bucket")
        yield url, client
    finally:
        stop(proc)


def bucket_keys(client, prefix: str) -> set[str]:
    keys = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix):
        keys |= {obj["Key"][len(prefix) :] for obj in page.get("Contents", [])}
    return keys


def test_round_trip_through_s3(copy, s3):
    url, client = s3
    snap, objects = prepare(copy)
    run(copy, "dvc", "remote", "add", "-d", "s3", "s3://bucket/store")
    run(copy, "dvc", "remote", "modify", "s3", "endpointurl", url)
    run(copy, "dvc", "remote", "modify", "--local", "s3", "access_key_id", "testing")
    run(copy, "dvc", "remote", "modify", "--local", "s3", "secret_access_key", "testing")
    # Credentials go to the git-ignored config.local, never to the committed config.
    assert "testing" not in (copy / ".dvc/config").read_text()
    assert "secret_access_key = testing" in (copy / ".dvc/config.local").read_text()
    assert run(copy, "git", "check-ignore", ".dvc/config.local").returncode == 0

    out = run(copy, "dvc", "push").stdout
    assert f"{len(objects)} files pushed" in out, out
    assert bucket_keys(client, "store/") == objects  # one S3 object per cache file, nothing else
    assert not (copy / ".dvc-storage").exists()  # the push went to S3, not the local default

    wipe(copy)
    out = run(copy, "dvc", "pull").stdout
    assert f"{len(objects)} files fetched" in out, out
    assert not (copy / ".dvc-storage").exists()
    assert CLEAN in run(copy, "dvc", "status").stdout
    assert snapshot(copy, CACHED) == snap
    check_against_lock(copy, snap)
