"""The monitoring stack in deploy/: promtool checks the Prometheus config and alert rules and
runs their unit tests; the compose file is checked by docker compose where one is installed
and for structure always; and a real Prometheus (Debian's package, on a free port) scrapes the
served app while the test sends test-split rows, then drifted ones, and reads the alerts and
every dashboard query back through Prometheus' HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from conftest import ROOT, free_port, stop

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana/dashboards/model-train.json"
INSTALL = "not installed: .ci/run installs Debian's prometheus package (prometheus, promtool)"
# What Grafana puts in for $__rate_interval with Prometheus scraping every second.
RATE_INTERVAL = "1m"


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is {INSTALL}")
    return path


def promtool(*args: str) -> str:
    res = subprocess.run(
        [tool("promtool"), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def test_promtool_checks_the_config_and_rules_and_runs_their_unit_tests():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def rules() -> list[dict]:
    return [
        r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]


def targets() -> list[dict]:
    return [t for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, `by (...)`/`on (...)` lists, function calls and operators are taken out."""
    expr = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    words = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return set(words) - {"or", "and", "unless", "group_left", "group_right", "bool"}


def test_rules_and_panels_name_no_job_and_the_drift_rule_no_threshold():
    exprs = [r["expr"] for r in rules()] + [t["expr"] for t in targets()]
    assert not [e for e in exprs if re.search(r"\bjob\s*=", e)]
    drift = [r for r in rules() if "Drift" in r["alert"]]
    assert len(drift) == 1 and "input_drift_psi_threshold" in drift[0]["expr"]
    assert not re.search(r"\d", drift[0]["expr"]), drift[0]["expr"]  # no level of its own
    assert metric_names(drift[0]["expr"]) == {"input_drift_psi", "input_drift_psi_threshold"}
    # One source for the threshold: params.yaml; neither the rules nor the drift report copy it.
    level = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]["drift_threshold"]
    for path in ("deploy/alerts.yml", "tools/drift.py"):
        assert not re.search(
            rf"(?<![\d.]){re.escape(str(level))}(?![\d])", (ROOT / path).read_text()
        ), path


def test_dashboard_panels_always_show_a_series_from_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    source = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert not dash["templating"]["list"]  # no variable, so no job or instance to pick
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"].endswith(" or vector(0)"), (panel["title"], t["expr"])
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("request rate", "errors", "p50", "p99", "drift", "warnings", "models"):
        assert needed in titles
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/model-train.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def compose_check_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or Debian's `docker-compose` (v1): either validates the
    file against the compose schema without a container engine."""
    if shutil.which("docker"):
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if v2.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_file_is_valid_and_its_parts_fit():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    command = compose_check_command()
    if command:  # the real parser: schema, interpolation, the build context
        res = subprocess.run(
            [*command, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stdout + res.stderr
    services = compose["services"]
    assert set(services) == {"app", "prometheus", "grafana"}
    build = services["app"]["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT and build["dockerfile"] == "Dockerfile"
    # Every file or folder the services mount is in the repo.
    mounts = {}
    for name, s in services.items():
        for v in s.get("volumes", []):
            src, dst = v.split(":")[:2]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), (name, src)
                mounts[dst] = (DEPLOY / src).resolve()
    # Prometheus reads its rules beside its config; it scrapes the app service on the port
    # the image serves; Grafana's datasource is the Prometheus service; its dashboards are
    # where its provisioning looks.
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if "config" in a)
    for rule_file in prom["rule_files"]:
        assert mounts[str(Path(config).parent / rule_file)] == DEPLOY / rule_file
    port = re.search(r"APP_PORT=(\d+)", (ROOT / "Dockerfile").read_text())[1]
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"app:{port}"]
    assert any(p.endswith(f":{port}") for p in services["app"]["ports"])
    source = yaml.safe_load(
        mounts["/etc/grafana/provisioning"].joinpath("datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    assert mounts["/etc/grafana/dashboards"] == DASHBOARD.parent


# --- a real Prometheus scraping the served app ---------------------------------------------


def rules_holding(tmp: Path, hold: str) -> Path:
    """A copy of alerts.yml with every `for:` set to `hold`, so alerts go pending in seconds."""
    doc = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = hold
    path = tmp / "alerts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prometheus_config(tmp: Path, target: str) -> Path:
    """deploy/prometheus.yml pointed at `target`, scraping and evaluating every second."""
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(rules_holding(tmp, "2s"))]
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Prometheus:
    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=10)

    def get(self, path: str, **params) -> dict | list:
        r = self.http.get(f"/api/v1/{path}", params=params)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("query", query=expr)["result"]

    def alerts(self, name: str, task: str) -> dict[str, str]:
        """{feature or "-": state} of the named alert's pending or firing instances."""
        return {
            a["labels"].get("feature", "-"): a["state"]
            for a in self.get("alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["labels"].get("task") == task
        }

    def wait(self, what: str, check, timeout: float = 45):
        deadline = time.monotonic() + timeout
        while not (found := check()):
            assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
            time.sleep(0.5)
        return found


def split_rows(repo: Path, n: int) -> list[dict]:
    """n rows (the test split repeated) of the served tabular model's features."""
    card = json.loads((repo / "models/tabular/model.json").read_text())
    names = [f["name"] for f in card["features"]]
    frame = pd.read_parquet(repo / "data/prepared/tabular/test.parquet")[names]
    frame = pd.concat([frame] * (n // len(frame) + 1), ignore_index=True).head(n)
    return json.loads(frame.to_json(orient="records"))


def send(server: str, rows: list[dict]) -> None:
    for i in range(0, len(rows), 500):
        r = httpx.post(f"{server}/predict/tabular", json={"rows": rows[i : i + 500]}, timeout=60)
        assert r.status_code == 200, r.text


@pytest.mark.slow
def test_live_prometheus_fires_drift_on_drifted_rows_only_and_feeds_every_panel(
    server, served_repo, tmp_path
):
    start = time.monotonic()
    params = yaml.safe_load((served_repo / "params.yaml").read_text())["serve"]
    window = params["drift_window"]
    # The window of every tabular feature holds test-split values only, before the first scrape.
    send(server, split_rows(served_repo, window))
    port = free_port()
    (tmp_path / "data").mkdir()
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={prometheus_config(tmp_path, server.split('//')[1])}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 (closed with the process)
    )
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        prom.wait("Prometheus to start", lambda: _ready(prom))
        psi = prom.wait("drift gauges", lambda: prom.query('input_drift_psi{task="tabular"}'))
        threshold = prom.query("input_drift_psi_threshold")
        assert [float(t["value"][1]) for t in threshold] == [params["drift_threshold"]]
        assert max(float(s["value"][1]) for s in psi) < params["drift_threshold"], psi
        # Quiet: five more evaluations, and the drift alert was never pending (ALERTS keeps
        # pending as well as firing instances).
        time.sleep(5)
        assert not prom.query('ALERTS{alertname="InputDrift",task="tabular"}[5m]')
        assert not prom.alerts("InputDrift", "tabular")

        # Drifted: heavier penguins (many beyond the validated range: warnings too), longer
        # flippers, the same islands; and one refused request, so request_errors exists.
        drifted = [
            {
                **r,
                "body_mass_g": plus(r["body_mass_g"], 4000),
                "flipper_length_mm": plus(r["flipper_length_mm"], 20),
            }
            for r in split_rows(served_repo, window)
        ]
        send(server, drifted)
        assert httpx.post(f"{server}/predict/tabular", json={}).status_code == 422
        fired = prom.wait(
            "the drift alert",
            lambda: (
                (a := prom.alerts("InputDrift", "tabular")).keys()
                >= {"body_mass_g", "flipper_length_mm"}
                and a
            ),
        )
        assert set(fired) == {"body_mass_g", "flipper_length_mm"}, fired  # island is unmoved
        assert set(fired.values()) <= {"pending", "firing"}
        prom.wait("the warnings alert", lambda: prom.alerts("InputWarningShare", "tabular"))
        assert not prom.alerts("ModelNotReady", "tabular")

        # Every dashboard query returns a series, and every metric it reads is scraped.
        scraped = set(prom.get("label/__name__/values"))
        for t in targets():
            expr = t["expr"].replace("$__rate_interval", RATE_INTERVAL)
            assert metric_names(expr) <= scraped, (expr, metric_names(expr) - scraped)
            assert prom.query(expr), expr
        assert time.monotonic() - start < 120
    finally:
        stop(proc)


def plus(value: float | None, shift: float) -> float | None:
    return None if value is None else value + shift


def _ready(prom: Prometheus) -> bool:
    try:
        return prom.http.get("/-/ready").status_code == 200
    except httpx.TransportError:
        return False
