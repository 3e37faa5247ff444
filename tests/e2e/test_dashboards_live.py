"""The dashboards and alert rules against live metrics: a real Prometheus (Debian's
`prometheus` binary) scrapes the mesh's processes every second, with the alert rules
loaded, while the test drives traffic through every part of the mesh. Then every panel
query of the five generated dashboards is evaluated through Prometheus's HTTP API.

Fails on a query Prometheus refuses, on a query naming a metric no process exposes,
and on a rule Prometheus cannot evaluate against the live series."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

import httpx
import pytest
import yaml

from services.testing.mesh import ROOT, SERVICE_MODULES, Mesh, write_api_key
from tests.helpers.mesh_calls import log_predictions, prediction
from tests.helpers.prometheus import RULES, running_prometheus
from tests.helpers.waiting import SLOW_MACHINE_S, wait_for

DASHBOARDS = ROOT / "deploy" / "helm" / "hearth" / "dashboards"
# Identifiers in PromQL that are functions or keywords, not metric names.
PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "rate", "increase",
                "histogram_quantile", "and", "or", "unless", "offset", "absent", "min_over_time", "le",
                "group_left", "group_right", "bool", "e", "inf", "nan", "time"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (strings, label matchers and grouping
    lists removed first)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {n for n in names if n.lower() not in PROMQL_WORDS and not n.startswith("$")}


@pytest.fixture(scope="module")
def scraped_mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("dash-mesh")
    mesh = Mesh.on_free_ports(base / "var", log_dir=base / "logs", extra_env={
        # A tiny limit on one route, so the rate-limit counter exists.
        "HEARTH_RATE_LIMITS": json.dumps({"GET /v1/experiment": {"per_s": 0.001, "burst": 2}})})
    mesh.data_dir.mkdir(parents=True)
    mesh.api_key = write_api_key(mesh.data_dir / "gateway-keys.json", "dash-admin", "admin")
    mesh.analyst_key = write_api_key(mesh.data_dir / "gateway-keys.json", "dash-analyst", "analyst")
    mesh.start_healthy(120)   # first: prometheus's targets are the mesh's ports, drawn until they bind
    targets = [(f"127.0.0.1:{mesh.metrics_ports[s]}", s) for s in SERVICE_MODULES]
    targets.append((f"127.0.0.1:{mesh.gateway_metrics_port}", "gateway"))
    try:
        with running_prometheus(base, targets) as url:
            yield mesh, url
    finally:
        mesh.stop()


def _log_prediction(mesh, prediction_id: str, account: str) -> None:
    log_predictions(mesh, [prediction(prediction_id, account, session_id="s-dash")])


def _drive_traffic(mesh) -> None:
    """Touch every part of the mesh once, so the labelled series the panels read exist."""
    t0 = time.time() - 2 * 86400
    events = [{"event_id": f"dash-{i}", "account_id": "dash-acc", "device_id": "tv-1", "device_type": "tv",
               "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + i * 300)), "kind": "heartbeat", "title_id": f"t-{i}", "series_id": "s",
               "genres": ["drama"], "duration_s": 300, "maturity": "adult"} for i in range(12)]
    iso = lambda ts: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))  # noqa: E731
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        assert c.post("/v1/events", json={"events": events}).status_code == 200
        session = c.get("/v1/household/dash-acc").json()["sessions"][0]["session_id"]
        assert c.post("/v1/assign", json={"account_id": "dash-acc", "session_id": session}).status_code == 200
        assert c.get("/v1/household/nobody").status_code == 404          # an RPC error series
        assert c.post("/v1/touchpoints", json={"touchpoints": [
            {"touchpoint_id": "dash-tp", "account_id": "dash-acc", "device_id": "tv-1", "ts": iso(t0),
             "channel": "search", "campaign": "c"}]}).status_code == 200
        assert c.post("/v1/conversions", json={"conversions": [
            {"conversion_id": "dash-cv", "account_id": "dash-acc", "ts": iso(t0 + 3600), "kind": "subscribe",
             "value": 1.0}]}).status_code == 200
        assert c.post("/v1/attribution", json={"account_ids": ["dash-acc"], "method": "markov",
                                               "level": "household"}).status_code == 200
        _log_prediction(mesh, "dash-pred", "dash-fb")
        assert c.post("/v1/feedback", json={"feedback_id": "dash-fb-1", "prediction_id": "dash-pred",
                                            "kind": "explicit_correct", "true_person_id": "p2",
                                            "ts": "2026-01-01T00:00:00Z"}).status_code == 200
        assert c.get("/v1/calibration", params={"group_by": "variant"}).status_code == 200
        statuses = [c.get("/v1/experiment").status_code for _ in range(4)]
        assert 200 in statuses and 429 in statuses                         # the rate-limit counter
        job = c.post("/v1/delete", json={"scope": {"kind": "device", "account_id": "dash-acc",
                                                   "device_id": "tv-1"}, "reason": "dashboards"})
        assert job.status_code == 202
        deadline = time.monotonic() + SLOW_MACHINE_S
        while c.get(f"/v1/delete/{job.json()['job_id']}").json()["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert httpx.get(mesh.url + "/v1/household/dash-acc", headers={"X-API-Key": "hk_wrong"}).status_code == 401
    assert httpx.post(mesh.url + "/v1/delete", headers={"X-API-Key": mesh.analyst_key},
                      json={"scope": {"kind": "household", "account_id": "dash-acc"}}).status_code == 403


def _query(url: str, expr: str) -> dict:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]


def _last_scrapes(url: str) -> dict[str, float]:
    """Each healthy target's last scrape (epoch seconds), by scrape URL."""
    targets = httpx.get(url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return {t["scrapeUrl"]: _epoch(t["lastScrape"]) for t in targets if t["health"] == "up"}


def _epoch(rfc3339: str) -> float:
    # Prometheus gives nanoseconds ("...:05.723715405+01:00" or "...Z"); datetime takes
    # at most microseconds.
    stamp, frac, zone = re.fullmatch(r"([^.]+?)(\.\d+)?(Z|[+-]\d\d:\d\d)", rfc3339).groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(stamp + zone).timestamp() + float(frac or 0)


def _scraped_after(url: str, since: dict[str, float] | float) -> dict[str, float] | None:
    """The last scrapes, once all five targets are up and each was scraped after ``since``
    (one time for all, or per target)."""
    scrapes = _last_scrapes(url)
    after = all(t > (since[u] if isinstance(since, dict) else since) for u, t in scrapes.items())
    return scrapes if len(scrapes) == 5 and after else None


def test_every_panel_query_evaluates_against_live_metrics(scraped_mesh):
    mesh, url = scraped_mesh
    _drive_traffic(mesh)
    traffic_done = time.time()
    # Two scrapes of every target after the last request, so every rate() has two samples:
    # read from Prometheus's own scrape times (a fixed sleep fell short when scrapes lagged
    # on a loaded machine).
    first = wait_for(lambda: _scraped_after(url, traffic_done), what="a scrape of all 5 targets after the traffic")
    wait_for(lambda: _scraped_after(url, first), what="a second scrape of all 5 targets")
    wait_for(lambda: _query(url, "count(hearth_deletion_jobs_finished_total{state=\"completed\"} > 0)")["result"],
             what="the finished deletion job scraped")
    exposed = set(httpx.get(url + "/api/v1/label/__name__/values", timeout=10).json()["data"])

    dashboards = {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}
    assert set(dashboards) == {"latency", "accuracy", "attribution", "drift", "infrastructure"}
    checked, with_data = 0, 0
    missing: list[str] = []
    for name, dashboard in dashboards.items():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m")
                for metric in metric_names(expr):
                    if metric not in exposed:
                        missing.append(f"{name} / {panel['title']}: {metric}")
                data = _query(url, expr)
                checked += 1
                with_data += bool(data["result"])
    assert not missing, "panels read metrics the mesh does not expose:\n" + "\n".join(missing)
    assert checked >= 40
    # Most panels show something after one pass of traffic (ratios of zero rates and
    # quantiles of series without observations are legitimately empty).
    assert with_data >= checked * 0.6, (with_data, checked)


def test_alert_rules_evaluate_without_errors_on_live_series(scraped_mesh):
    _mesh, url = scraped_mesh
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:
        groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] != "unknown" for r in rules):   # each evaluated at least once
            break
        assert time.monotonic() < deadline, [(r["name"], r["health"]) for r in rules]
        time.sleep(0.5)
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    shipped = yaml.safe_load(RULES.read_text())
    assert len(rules) == sum(len(g["rules"]) for g in shipped["groups"])
    # Every metric a rule reads is exposed by the mesh or recorded by another rule.
    exposed = set(httpx.get(url + "/api/v1/label/__name__/values", timeout=10).json()["data"])
    recorded = {r["record"] for g in shipped["groups"] for r in g["rules"] if "record" in r}
    for rule in (r for g in shipped["groups"] for r in g["rules"]):
        unknown = metric_names(rule["expr"]) - exposed - recorded
        assert not unknown, (rule.get("alert") or rule.get("record"), unknown)
