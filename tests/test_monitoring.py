"""Monitoring: the Prometheus rules pass promtool (syntax and unit tests), and a real
Prometheus server on loopback scrapes a running service and answers PromQL about it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import COLORS
from tests.test_service import _b64, _free_port, _png, _serve, _stop

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy/prometheus"


def _bin(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: `make tools` installs the Debian package prometheus")
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "tuneserve.rules.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "tuneserve.rules.test.yml"],
    ],
    ids=["check-rules", "check-config", "test-rules"],
)
def test_promtool(args):
    r = subprocess.run([_bin("promtool"), *args], cwd=PROM, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_summary_and_a_runbook():
    groups = yaml.safe_load((PROM / "tuneserve.rules.yml").read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "TuneserveDriftSustained",
        "TuneserveHighErrorRatio",
        "TuneserveHighLatencyP99",
        "TuneserveModelNotReady",
    }
    for a in alerts:
        assert a["annotations"]["summary"] and a["annotations"]["runbook"], a["alert"]
        assert "for" in a, f"{a['alert']} fires on one evaluation"


@pytest.fixture(scope="module")
def scraped_service(calibrated, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    proc, url = _serve(calibrated, tmp / "svc.log", TUNESERVE_DRIFT_INTERVAL_S="1")
    try:  # a Prometheus that cannot start must not leave the service running
        yield from _prometheus_scraping(url, tmp)
    finally:
        _stop(proc)


def _prometheus_scraping(url: str, tmp):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM / "tuneserve.rules.yml")]
    config["scrape_configs"] = [
        {"job_name": "tuneserve", "static_configs": [{"targets": [url.removeprefix("http://")]}]}
    ]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    prom = subprocess.Popen(
        [
            _bin("prometheus"),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=open(tmp / "prometheus.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield url, f"http://127.0.0.1:{port}"
    finally:
        prom.terminate()
        prom.wait(timeout=30)


def _query(prom: str, expr: str, timeout: float = 60) -> list[dict]:
    """Poll the HTTP API until the expression has a result."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            response = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
            # 503 "Service Unavailable" (plain text) until Prometheus has started
            r = response.json() if response.status_code == 200 else {"status": "starting"}
            result = r["data"]["result"] if r["status"] == "success" else []
            if result and all(x["value"][1] not in ("NaN", "+Inf", "-Inf") for x in result):
                return result
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"Prometheus returned nothing for {expr!r} in {timeout} s")


def test_prometheus_scrapes_the_service_and_evaluates_the_rules(scraped_service):
    url, prom = scraped_service
    up = _query(prom, 'up{job="tuneserve"}')  # Prometheus is up and scraping before traffic
    assert up[0]["value"][1] == "1"
    body = {"inputs": [_b64(_png(COLORS[c], seed=i)) for i in range(20) for c in COLORS]}
    for _ in range(12):  # 720 images: a full drift window in each of the workers
        assert httpx.post(url + "/predict", json=body).status_code == 200
        time.sleep(0.5)  # traffic across several scrapes, so rate() has two samples
    # the filter keeps the result empty, so _query polls, until every prediction is scraped
    predictions = _query(prom, 'sum(tuneserve_predictions_total{model="colors"}) >= 720')
    assert float(predictions[0]["value"][1]) == 720
    shares = _query(prom, 'tuneserve:class_share:ratio5m{model="colors"}')
    assert abs(sum(float(s["value"][1]) for s in shares) - 1) < 1e-6
    psi = _query(prom, 'tuneserve:prediction_psi:5m{model="colors"}')
    assert float(psi[0]["value"][1]) >= 0
    scores = _query(prom, 'max by (check) (tuneserve_drift_score{model="colors"})')
    assert {s["metric"]["check"] for s in scores} == {
        "prediction",
        "confidence",
        "embedding",
        "input",
    }
    info = _query(prom, 'tuneserve_model_info{model="colors"}')
    assert info[0]["metric"]["provider"] == "CPUExecutionProvider"


def _panels() -> list[dict]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/tuneserve.json").read_text())
    assert dash["uid"] == "tuneserve-overview"
    assert any(
        v["name"] == "datasource" and v["type"] == "datasource" for v in dash["templating"]["list"]
    )
    return dash["panels"]


def test_dashboard_panels_use_the_datasource_variable_and_cover_the_issue():
    panels = _panels()
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for series in (
        "tuneserve_predictions_total",
        "bentoml_service_request_duration_seconds_bucket",
        "tuneserve_batch_size",
        "tuneserve_request_errors_total",
        "tuneserve:class_share:ratio5m",
        "tuneserve_reference_class_ratio",
        "tuneserve_prediction_confidence_bucket",
        "tuneserve_drift_score",
        "tuneserve_model_info",
        "tuneserve_real_time_factor_bucket",
        "tuneserve_decode_step_sequences_sum",
    ):
        assert series in exprs, f"no panel shows {series}"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provider.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


def test_every_dashboard_query_is_accepted_by_prometheus(scraped_service):
    _url, prom = scraped_service
    _query(prom, 'up{job="tuneserve"}')
    for p in _panels():
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
            r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "success", (p["title"], r.text)
