"""What an HTTP client gets from every API route while a service it needs is down,
through real processes (docs/operations.md, "Outages"): each service stopped in turn,
then all of them. Every answer is the route's own (2xx/4xx, when the route does not need
the stopped service) or a 503 with the error table's JSON body and a Retry-After, within
the gateway's deadline: never a 500/502 "upstream error" with a traceback in a service's
log (until session 21 POST /v1/attribution per person was a 502 with clustering stopped:
attribution let the peer's UNAVAILABLE through as INTERNAL). With every service stopped
the gateway's own readiness path, the chart's readinessProbe, stays 200: the gateway
stays in its Service and answers those 503s itself instead of leaving the ingress to
answer its own 503 page (docs/deploy.md, "Probes and shutdown")."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import httpx
import pytest
import yaml

from services.testing.mesh import SERVICE_MODULES, running_mesh
from tests.deploy.conftest import ROOT
from tests.helpers.waiting import SLOW_MACHINE_S

RUN = uuid.uuid4().hex[:6]
ACCT = f"e2e-down-{RUN}"
# The gateway's deadline on the services (HEARTH_RPC_TIMEOUT_S) and a margin for a loaded machine.
DEADLINE_S = 10.0 + 5.0
READINESS_PATH = yaml.safe_load((ROOT / "deploy/helm/hearth/values.yaml").read_text())[
    "gateway"]["probes"]["readinessPath"]


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z")


T0 = time.time() - 3 * 86400
# One request per API route (every route /openapi.json lists: checked below).
ROUTES = [
    ("POST", "/v1/events", "/v1/events", {"events": [{
        "event_id": f"{ACCT}-e", "account_id": ACCT, "device_id": "tv-1", "device_type": "tv", "ts": _iso(T0),
        "kind": "heartbeat", "title_id": "t", "genres": [], "duration_s": 10}]}),
    ("POST", "/v1/events/status", "/v1/events/status", {"account_id": ACCT, "event_ids": [f"{ACCT}-e"]}),
    ("GET", "/v1/household/{account_id}", f"/v1/household/{ACCT}", None),
    ("POST", "/v1/assign", "/v1/assign", {"account_id": ACCT, "session_id": "no-such-session"}),
    ("POST", "/v1/touchpoints", "/v1/touchpoints", {"touchpoints": [{
        "touchpoint_id": f"{ACCT}-t", "account_id": ACCT, "device_id": "tv-1", "ts": _iso(T0),
        "channel": "email", "campaign": "spring"}]}),
    ("POST", "/v1/conversions", "/v1/conversions", {"conversions": [{
        "conversion_id": f"{ACCT}-c", "account_id": ACCT, "ts": _iso(T0 + 3600), "kind": "subscribe", "value": 1.0}]}),
    ("POST", "/v1/attribution", "/v1/attribution", {"account_ids": [ACCT], "method": "shapley", "level": "person"}),
    ("POST", "/v1/feedback", "/v1/feedback", {"feedback_id": f"{ACCT}-f", "prediction_id": "no-such-prediction",
                                              "kind": "explicit_confirm"}),
    ("GET", "/v1/calibration", "/v1/calibration", None),
    ("GET", "/v1/experiment", "/v1/experiment", None),
    ("PUT", "/v1/experiment", "/v1/experiment", {"kill_switch": False, "reason": "e2e services down"}),
    ("GET", "/v1/calibrators/{variant}", "/v1/calibrators/kmeans", None),
    ("PUT", "/v1/calibrators/{variant}", "/v1/calibrators/kmeans", {"version": 0, "reason": "e2e services down"}),
    ("GET", "/v1/audit", "/v1/audit", None),
    ("GET", "/v1/audit/export", "/v1/audit/export", None),
    ("POST", "/v1/delete", "/v1/delete", {"scope": {"kind": "household", "account_id": f"{ACCT}-gone"}}),
    ("GET", "/v1/delete/{job_id}", "/v1/delete/job-none", None),
    ("GET", "/v1/household/{account_id}/export", f"/v1/household/{ACCT}/export", None),
    ("GET", "/v1/consent/{account_id}", f"/v1/consent/{ACCT}", None),
    ("PUT", "/v1/consent/{account_id}", f"/v1/consent/{ACCT}", {"processing": True, "attribution": True}),
    ("POST", "/v1/keys/rotate", "/v1/keys/rotate", {"new_active_kek_id": "no-such-kek"}),
    # A household without a data key (404 before any store is asked), and a batch of none.
    ("POST", "/v1/household/{account_id}/rotate-key", f"/v1/household/{ACCT}-nokey/rotate-key", None),
    ("POST", "/v1/keys/rotate-households", "/v1/keys/rotate-households", {"older_than_days": 36500, "limit": 5}),
    ("GET", "/v1/keys/rotate-households/{job_id}", "/v1/keys/rotate-households/rot-none", None),
]


def _answers(client: httpx.Client) -> dict[str, tuple[int, str]]:
    """Each route's status; fails on any answer an outage must not give."""
    seen = {}
    for method, template, path, body in ROUTES:
        started = time.monotonic()
        r = client.request(method, path, json=body)
        took = time.monotonic() - started
        where = f"{method} {template}: {r.status_code} {r.text[:300]}"
        assert took < DEADLINE_S, f"{where} after {took:.1f} s"
        assert r.status_code < 500 or r.status_code == 503, where
        if r.status_code == 503:
            assert r.headers["content-type"].startswith("application/json"), where
            assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"code", "field", "message"}, where
            assert r.headers["retry-after"].isdigit(), where
        seen[f"{method} {template}"] = (r.status_code, r.json()["error"]["code"] if r.status_code == 503 else "")
    return seen


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    # POST /v1/feedback names a prediction no one handed out: the gateway waits for it
    # (HEARTH_FEEDBACK_PREDICTION_WAIT_S, 2 s) before its 404 (or, clustering stopped, its
    # 503), once per pass over the routes (nine). A shorter wait takes the same path, retries
    # included; what the tests assert is the answer, not how long the gateway waited.
    with running_mesh(tmp_path_factory.mktemp("down"), {"e2e-admin": "admin"}, timeout_s=SLOW_MACHINE_S,
                      extra_env={"HEARTH_FEEDBACK_PREDICTION_WAIT_S": "0.2"}) as m:
        yield m


@pytest.fixture(scope="module")
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=60) as c:
        yield c


def test_the_route_list_is_every_api_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    listed = {(m.upper(), p) for p, ops in paths.items() for m in ops if p != "/health"}
    assert listed == {(m, t) for m, t, _, _ in ROUTES}


@pytest.mark.parametrize("stopped", sorted(SERVICE_MODULES))
def test_every_route_with_one_service_stopped_is_its_own_answer_or_a_json_503(mesh, client, stopped):
    assert all(status < 500 for status, _ in _answers(client).values())
    mesh.stop_process(stopped)
    try:
        seen = _answers(client)
        assert any(status == 503 for status, _ in seen.values()), seen   # its own routes at least
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "DEGRADED", health.text
    finally:
        mesh.start_service(stopped)
        mesh.wait_healthy(SLOW_MACHINE_S)


def test_with_every_service_stopped_the_gateway_stays_ready_and_answers_json_503s(mesh, client):
    for name in SERVICE_MODULES:
        mesh.stop_process(name)
    try:
        seen = _answers(client)
        assert {status for status, _ in seen.values()} == {503}, seen
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "NOT_SERVING", health.text
        assert client.get(READINESS_PATH).status_code == 200
    finally:
        for name in SERVICE_MODULES:
            mesh.start_service(name)
        mesh.wait_healthy(SLOW_MACHINE_S)
