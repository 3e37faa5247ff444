"""End to end through real processes: events in through the gateway, sessions back
out, one trace across the gateway and the clustering service, metrics on every service."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.helpers.waiting import SLOW_MACHINE_S, wait_for
from tests.helpers.timestamps import iso_utc as _iso

HOUR = 3600


def _events(account: str, start: float, n: int, device: str = "tv-1", first: int = 0):
    return [{"event_id": f"{account}-{device}-{first + i}", "account_id": account, "device_id": device,
             "device_type": "tv", "ts": _iso(start + i * 300), "kind": "heartbeat", "title_id": f"title-{i}",
             "series_id": "show-1", "genres": ["drama", "crime"], "duration_s": 300, "maturity": "adult"}
            for i in range(n)]


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=10) as c:
        yield c


def test_health_reports_every_service_serving(client):
    body = client.get("/health").json()
    assert body["status"] == "SERVING"
    assert set(body["services"]) == {"clustering", "attribution", "privacy", "feedback"}


def test_events_come_back_as_sessions_with_one_trace(client, mesh):
    start = time.time() - 2 * 86400
    events = _events("e2e-acc-1", start, 4) + _events("e2e-acc-1", start + 5 * HOUR, 2, first=100)
    response = client.post("/v1/events", json={"events": events})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 6, "duplicates": 0, "rejected_late": 0, "sessions_touched": 2,
                               "rejected_expired": 0}
    trace_id = response.headers["x-trace-id"]

    again = client.post("/v1/events", json={"events": events[:2]})
    assert again.json()["duplicates"] == 2

    household = client.get("/v1/household/e2e-acc-1").json()
    assert household["devices"][0]["device_id"] == "tv-1"
    assert [s["event_count"] for s in household["sessions"]] == [2, 4]
    assert all(s["closed"] and len(s["feature_vector"]) == 35 for s in household["sessions"])

    spans = [json.loads(line) for line in mesh.spans_path.read_text().splitlines() if line.strip()]
    in_trace = [s for s in spans if s["trace_id"] == trace_id]
    services = {s["service"] for s in in_trace}
    assert {"gateway", "clustering"} <= services, services
    server_span = next(s for s in in_trace if s["service"] == "clustering" and s["kind"] == "SERVER")
    assert server_span["name"].endswith("IngestEvents")
    assert server_span["parent_span_id"] in {s["span_id"] for s in in_trace if s["service"] == "gateway"}


def test_an_events_utc_offset_is_stored_and_the_sessions_hour_is_local(client):
    """Local time through real processes (session 23): events sent with the device's UTC
    offset (India, +05:30) are stored with it (the export returns it) and the session's
    hour feature is the local hour, not the UTC one; the same events without it give the
    UTC hour (today's behaviour)."""
    import math

    start = (time.time() - 2 * 86400) // 3600 * 3600 + 15 * 60    # hh:15 UTC, two days ago
    utc_hour = time.gmtime(start).tm_hour + 0.25
    for account, offset in (("e2e-acc-local", 330), ("e2e-acc-utc", None)):
        events = _events(account, start, 3)
        if offset is not None:
            for e in events:
                e["utc_offset_minutes"] = offset
        response = client.post("/v1/events", json={"events": events})
        assert response.status_code == 200 and response.json()["accepted"] == 3, response.text
    hours = {}
    for account in ("e2e-acc-local", "e2e-acc-utc"):
        (session,) = client.get(f"/v1/household/{account}").json()["sessions"]
        sin_h, cos_h = session["feature_vector"][:2]
        hours[account] = math.atan2(sin_h, cos_h) * 24 / (2 * math.pi) % 24
    assert hours["e2e-acc-utc"] == pytest.approx(utc_hour, abs=1e-3)
    assert hours["e2e-acc-local"] == pytest.approx((utc_hour + 5.5) % 24, abs=1e-3)
    export = client.get("/v1/household/e2e-acc-local/export")
    assert export.status_code == 200, export.text
    assert [e["utc_offset_minutes"] for e in export.json()["services"]["clustering"]["events"]] == [330] * 3


def test_a_forwarded_prediction_links_back_to_the_assign_request_trace(client, mesh):
    """Clustering forwards predictions to feedback later, from a thread of its own, so
    RecordPrediction is a trace of its own; its ``predictions.forward`` root span links
    to the span of the request that made each prediction (it used to be an orphan trace
    no one could connect to the /v1/assign that caused it)."""
    from tests.helpers.waiting import wait_for

    start = time.time() - 2 * 86400
    assert client.post("/v1/events", json={"events": _events("e2e-acc-link", start, 3)}).status_code == 200
    session_id = client.get("/v1/household/e2e-acc-link").json()["sessions"][0]["session_id"]
    response = client.post("/v1/assign", json={"account_id": "e2e-acc-link", "session_id": session_id})
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-trace-id"]

    def forward_span():
        spans = [json.loads(line) for line in mesh.spans_path.read_text().splitlines() if line.strip()]
        for span in spans:
            if span["name"] == "predictions.forward" and any(
                    link["trace_id"] == trace_id for link in span.get("links", ())):
                return span, spans
        return None

    span, spans = wait_for(forward_span, what="a predictions.forward span linked to the assign trace")
    assert span["service"] == "clustering" and span["parent_span_id"] is None
    linked = next(link for link in span["links"] if link["trace_id"] == trace_id)
    assert linked["span_id"] in {s["span_id"] for s in spans if s["trace_id"] == trace_id}
    # The RecordPrediction call itself is inside the forward span's trace.
    record = [s for s in spans if s["trace_id"] == span["trace_id"] and s["name"].endswith("RecordPrediction")]
    assert {s["service"] for s in record} >= {"clustering", "feedback"}


def test_unknown_household_is_404_json(client):
    response = client.get("/v1/household/nobody-here")
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "account_id"


@pytest.mark.parametrize("mutate,field", [
    (lambda e: e.pop("account_id"), "events[0].account_id"),
    (lambda e: e.update(device_type="fridge"), "events[0].device_type"),
    (lambda e: e.update(ts="not a time"), "events[0].ts"),
    (lambda e: e.update(surprise=1), "events[0].surprise"),
    (lambda e: e.update(duration_s=-5), "events[0].duration_s"),
])
def test_bad_events_get_422_naming_the_field_and_store_nothing(client, mutate, field):
    good = _events("e2e-bad-acc", time.time() - 86400, 2)
    mutate(good[0])
    response = client.post("/v1/events", json={"events": good})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert client.get("/v1/household/e2e-bad-acc").status_code == 404


def test_requests_without_a_valid_key_are_401(mesh):
    assert httpx.get(mesh.url + "/v1/household/x", timeout=5).status_code == 401
    assert httpx.get(mesh.url + "/v1/household/x", headers={"X-API-Key": "wrong"}, timeout=5).status_code == 401


def test_every_service_exposes_rpc_latency_histograms(client, mesh):
    client.get("/v1/household/e2e-acc-1")
    text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports['clustering']}/metrics", timeout=5).text
    assert 'hearth_rpc_duration_seconds_bucket{le="0.005",method="GetHousehold",service="clustering"}' in text
    for name, port in mesh.metrics_ports.items():
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "hearth_rpc_duration_seconds" in body, name
    # The gateway's metrics are on their own port, not on the public one.
    gateway_metrics = httpx.get(f"http://127.0.0.1:{mesh.gateway_metrics_port}/metrics", timeout=5).text
    assert "hearth_http_requests_total" in gateway_metrics
    assert client.get("/metrics").status_code == 404


def test_the_gateway_serves_exactly_the_routes_of_the_permission_matrix(client):
    # Every route of the matrix (services/common/permissions.py) is served, and every
    # served /v1 route is in the matrix (otherwise it would be refused for every role).
    from services.common.permissions import ROUTES

    paths = client.get("/openapi.json").json()["paths"]
    served = {f"{method.upper()} {path}" for path, methods in paths.items() if path.startswith("/v1/")
              for method in methods}
    assert served == set(ROUTES)
    assert len(served) >= 16 and "/health" in paths   # 16 /v1 routes today, plus /health


def _served_across(spans_path, service: str, method: str, at_ns: int) -> list[dict]:
    """``service``'s server spans of ``method`` that began before ``at_ns`` and ended after it."""
    spans = [json.loads(line) for line in spans_path.read_text().splitlines() if line.strip()]
    return [s for s in spans if s["service"] == service and s["kind"] == "SERVER"
            and s["name"].endswith("/" + method) and s["start_ns"] < at_ns < s["end_ns"]]


def _calls_in_flight(mesh, service: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports[service]}/metrics", timeout=2).text
    prefix = f'hearth_rpc_in_flight{{service="{service}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


# What a request may get while clustering drains: OK, refused because clustering is
# going away (503), or told to slow down by the gateway's rate limiter (429, answered before
# clustering is reached). A 499, another 5xx or a dropped connection is a failure.
CLEAN_STATUSES = (200, 503, 429)


def _post_batches_through_sigterm(mesh, account: str, attempt: int):
    """Four clients post event batches; clustering gets SIGTERM while it is serving one
    (its ``hearth_rpc_in_flight`` says so). Returns ([(start, end, status, device, body)],
    the signal's monotonic and wall-clock time)."""
    import threading

    stop, lock = threading.Event(), threading.Lock()
    results: list[tuple[float, float, int, str, str]] = []

    def post_batches(worker: int) -> None:
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
            n = 0
            while not stop.is_set():
                device = f"a{attempt}-w{worker}-b{n}"
                # _events gives RFC 3339 times already; (n % 40) keeps every batch in the past
                # (events may not be stamped more than 10 min ahead of the server's clock).
                batch = _events(account, int(time.time()) - 3 * 86400 + (n % 40) * 3600, 300, device=device)
                started = time.monotonic()
                response = c.post("/v1/events", json={"events": batch})
                with lock:
                    results.append((started, time.monotonic(), response.status_code, device,
                                    "" if response.status_code in CLEAN_STATUSES else response.text[:300]))
                n += 1
                if response.status_code in (429, 503):
                    # As a client should: wait as told (capped, so the test keeps moving).
                    # Without it, on an idle machine the four loops answered 503 at once
                    # posted hundreds a second after the signal and the gateway's rate
                    # limiter (shared by this session's tests) refused them with 429.
                    time.sleep(min(float(response.headers.get("retry-after", 0.2) or 0.2), 0.5))

    workers = [threading.Thread(target=post_batches, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 30
        while sum(1 for r in results if r[2] == 200) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)    # traffic is flowing before the signal
        deadline = time.monotonic() + 10
        while _calls_in_flight(mesh, "clustering") < 1 and time.monotonic() < deadline:
            pass                # signal while clustering is serving a call
        signal_at, signal_ns = time.monotonic(), time.time_ns()
        mesh.stop_process("clustering")   # SIGTERM; returns once the process has exited
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    return results, signal_at, signal_ns


def test_sigterm_drains_in_flight_requests_and_restart_keeps_data(client, mesh):
    """Clients keep posting event batches while clustering gets SIGTERM: calls clustering
    is serving at the signal finish (OK, their requests 200 and durable), requests
    reaching it later are refused cleanly (503), never a 499, another 5xx or a dropped
    connection; every acknowledged batch is there after the restart."""
    account, results, drained, signal_at = "e2e-drain", [], [], 0.0
    # A household stored before any of this, to find again after the restart (the test
    # brings its own: it used another test's household and failed when run alone).
    before = "e2e-drain-before"
    assert client.post("/v1/events", json={"events": _events(before, time.time() - 2 * 86400, 3)}).status_code == 200
    try:
        for attempt in range(3):
            if attempt:   # no call was inside clustering at the signal: the drain went untested
                mesh.start_service("clustering")
                mesh.wait_healthy(SLOW_MACHINE_S)
            attempt_results, signal_at, signal_ns = _post_batches_through_sigterm(mesh, account, attempt)
            results += attempt_results
            # Clustering's own spans say which calls it was serving when the signal came.
            drained = _served_across(mesh.spans_path, "clustering", "IngestEvents", signal_ns)
            if drained:
                break
        # The gateway stays ready (one service down must not take the whole HTTP API out of
        # the Kubernetes Service): /health is 200 DEGRADED and names the service; its routes
        # answer 503 with Retry-After, the other services' routes keep working.
        health = client.get("/health")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "DEGRADED"
        assert health.json()["services"]["clustering"].startswith("UNREACHABLE")
        assert health.json()["services"]["attribution"] == "SERVING"
        down = client.get(f"/v1/household/{before}")
        assert down.status_code == 503 and down.headers["retry-after"].isdigit(), down.text
        up = client.post("/v1/touchpoints", json={"touchpoints": [{
            "touchpoint_id": "e2e-while-clustering-down", "account_id": before, "device_id": "tv",
            "ts": _iso(time.time() - 3600), "channel": "email", "campaign": "c"}]})
        assert up.status_code == 200, up.text
        # Nothing under way is cut: every call clustering was serving at the signal finished
        # OK within the grace (HEARTH_GRACE_SECONDS >= the gateway's deadline) and its request
        # got 200; a request reaching clustering later was refused cleanly (503). A 499 or
        # another 5xx fails.
        assert drained, "in 3 attempts no IngestEvents call was inside clustering at the signal"
        assert [str(s["attributes"].get("rpc.grpc.status_code")) for s in drained] == ["0"] * len(drained), drained
        assert {r[2] for r in results} <= set(CLEAN_STATUSES), [r[4] for r in results if r[4]][:3]
        in_flight = [r for r in results if r[0] < signal_at < r[1]]
        assert sum(1 for r in in_flight if r[2] == 200) >= len(drained), in_flight
    finally:  # the module's later tests share this mesh: restart clustering even on a failure
        mesh.start_service("clustering")
        mesh.wait_healthy(SLOW_MACHINE_S)
    household = client.get(f"/v1/household/{account}")
    assert household.status_code == 200
    stored_devices = {s["device_id"] for s in household.json()["sessions"]}
    acknowledged = {r[3] for r in results if r[2] == 200}
    assert acknowledged <= stored_devices, sorted(acknowledged - stored_devices)
    assert client.get(f"/v1/household/{before}").status_code == 200


def test_assign_through_the_gateway(client):
    from tests.helpers.households import household_events, week_start_days_ago

    events, _ = household_events("e2e-assign", ("kid", "parent"), days=12, start_ts=week_start_days_ago(20))
    body = [{"event_id": e.event_id, "account_id": e.account_id, "device_id": e.device_id,
             "device_type": e.device_type, "ts": _iso(e.ts), "kind": e.kind, "title_id": e.title_id,
             "series_id": e.series_id, "genres": list(e.genres), "duration_s": e.duration_s,
             "maturity": e.maturity} for e in events]
    assert client.post("/v1/events", json={"events": body}).status_code == 200
    # The ingest queued the household's first fit. An assignment before it is stored
    # waits for it (one fit, not a second one beside it: ModelKeeper.refresh), but on
    # 2 cores at load 16-19 that one fit still took more than the gateway's 10 s deadline
    # (session 25: 504 in 2 of 2 runs with the wait alone), and a 504 there is the
    # documented answer (docs/operations.md), not what this test is about. It waits for
    # the model, then asserts the assignment's answer; an assignment racing the fit is
    # tests/integration/test_clustering_service.py's.
    household = wait_for(lambda: (h := client.get("/v1/household/e2e-assign").json())["model_version"] > 0 and h,
                         what="the household's first model")
    session = household["sessions"][0]
    r = client.post("/v1/assign", json={"account_id": "e2e-assign", "session_id": session["session_id"]})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["person_id"] in {p["person_id"] for p in answer["probabilities"]}
    total = sum(p["probability"] for p in answer["probabilities"])
    if len(answer["probabilities"]) > 1:
        assert abs(total - 1) < 1e-6, answer
    else:  # one person so far: the rest is a member not seen yet (docs/clustering.md)
        assert 0.5 < total <= 1.0, answer
    assert answer["prediction_id"].startswith("pr-") and answer["model_version"] >= 1
    by_vector = client.post("/v1/assign", json={"account_id": "e2e-assign", "feature_vector": session["feature_vector"]})
    assert by_vector.status_code == 200 and by_vector.json()["person_id"] == answer["person_id"]
    both = client.post("/v1/assign", json={"account_id": "e2e-assign", "session_id": "x", "feature_vector": [0.0] * 35})
    assert both.status_code == 422
    short = client.post("/v1/assign", json={"account_id": "e2e-assign", "feature_vector": [0.0] * 3})
    assert short.status_code == 422 and short.json()["error"]["field"] == "feature_vector"


def test_household_status_reports_genres_outside_the_vocabulary(client):
    start = time.time() - 3 * 86400
    events = _events("e2e-genres", start, 3) + [
        {**e, "genres": ["drama", "k_drama"]} for e in _events("e2e-genres", start, 2, first=10)]
    assert client.post("/v1/events", json={"events": events}).status_code == 200
    status = client.get("/v1/household/e2e-genres").json()["status"]
    assert status["unknown_genres"] == {"k_drama": 2}
