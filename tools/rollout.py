"""Load, reload or roll back a task's model on the running server, through its API (Triton's
model repository extension, app/repository.py):

    python -m tools.rollout load TASK [--path FOLDER | --version V]   # none: what serve.model names
    python -m tools.rollout rollback TASK                              # make rollback TASK=tabular
    python -m tools.rollout index                                      # what each task serves

The server is serve.host:serve.port unless --url says otherwise; with APP_API_KEYS in the
environment (keys, or a file of keys, as the server reads it) the first key goes along.
The answer comes once every worker serves the new version; a refused load (4xx) leaves the
old one serving and exits 1 with the server's sentence.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request

from app.settings import load_settings, parse_api_keys
from stages.core import layout


def call(url: str, path: str, body: dict | None = None) -> object:
    keys = parse_api_keys(os.environ.get("APP_API_KEYS", ""))
    headers = {"Content-Type": "application/json"}
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        message = json.loads(e.read() or b"{}").get("error", e.reason)
        raise SystemExit(f"error: {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"error: {url}: {e.reason} (is the server running?)") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="default: http://serve.host:serve.port")
    sub = ap.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load", help="load a version on every worker")
    load.add_argument("task")
    which = load.add_mutually_exclusive_group()
    which.add_argument(
        "--path",
        help=f"a folder inside serve.model_root ({layout.MODEL_ONNX_FILE} + {layout.CARD_FILE})",
    )
    which.add_argument("--version", help="a registry version (v0.0.3)")
    sub.add_parser("rollback", help="load the version served before").add_argument("task")
    sub.add_parser("index", help="what each task serves")
    args = ap.parse_args(argv)
    if args.url is None:
        cfg = load_settings()
        args.url = f"http://{cfg.host}:{cfg.port}"
    if args.cmd == "index":
        print(json.dumps(call(args.url, "/v2/repository/index"), indent=2))
        return
    if args.cmd == "rollback":
        parameters = {"rollback": True}
    else:
        parameters = {k: v for k, v in (("path", args.path), ("version", args.version)) if v}
    answer = call(args.url, f"/v2/repository/models/{args.task}/load", {"parameters": parameters})
    print(
        f"{answer['name']}: serving {answer['version']} ({answer['source']}) on {answer['workers']} worker(s)"
    )


if __name__ == "__main__":
    main()
