"""Traces leave the processes over OTLP: the four services export over gRPC and the
gateway over HTTP/protobuf to a real OTLP receiver (opentelemetry-proto's TraceService),
through the batch span processor, configured only by standard OTEL_* variables.

Each request is one tree: one root (the gateway's server span), every other span's
parent in the same trace. A deletion's fan-out (Erase in attribution, feedback and
clustering, run later by the privacy worker) joins the trace of its POST /v1/delete."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from services.testing.mesh import running_mesh
from tests.helpers.otlp import OtlpReceiver, tree_roots
from tests.helpers.waiting import SLOW_MACHINE_S, wait_for
from tests.helpers.timestamps import iso_utc as _iso

SPAN_KIND_SERVER = 2


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory):
    receiver = OtlpReceiver().start()
    base = tmp_path_factory.mktemp("otlp-mesh")
    common = {"HEARTH_TRACE_EXPORT": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "100",
              "OTEL_TRACES_SAMPLER": "parentbased_always_on",
              "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=e2e"}
    try:
        with running_mesh(
                base, {"otlp-admin": "admin"}, timeout_s=120,
                extra_env={**common, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.grpc_port}"},
                process_env={"gateway": {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                         "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.http_port}"}}) as mesh:
            yield mesh, receiver
    finally:
        receiver.stop()


def _rooted_at_the_gateway(spans) -> bool:
    """The spans form one tree whose root is the gateway's server span. A lone subtree is
    not enough: processes export on their own schedules, so a child process's spans can
    all arrive while the gateway's root is still in its exporter's batch (CI saw exactly
    that: one root, whose parent had not arrived yet)."""
    roots = tree_roots(spans)
    return (len(roots) == 1 and roots[0].parent_span_id == "" and roots[0].service == "gateway"
            and roots[0].kind == SPAN_KIND_SERVER)


def _assert_one_tree(spans) -> None:
    roots = tree_roots(spans)
    assert len(roots) == 1, [(s.service, s.name, s.parent_span_id) for s in roots]
    (root,) = roots
    assert root.parent_span_id == "" and root.service == "gateway" and root.kind == SPAN_KIND_SERVER
    assert len({s.span_id for s in spans}) == len(spans)


def test_attribution_request_is_one_trace_across_processes(traced_mesh):
    mesh, receiver = traced_mesh
    t0 = time.time() - 3 * 86400
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        touches = [{"touchpoint_id": f"otlp-tp-{i}", "account_id": "otlp-att", "device_id": "tv-1",
                    "ts": _iso(t0 + i * 3600), "channel": ["search", "email"][i % 2], "campaign": "c"}
                   for i in range(4)]
        assert client.post("/v1/touchpoints", json={"touchpoints": touches}).status_code == 200
        assert client.post("/v1/conversions", json={"conversions": [
            {"conversion_id": "otlp-conv", "account_id": "otlp-att", "ts": _iso(t0 + 5 * 3600),
             "kind": "subscribe", "value": 3.0}]}).status_code == 200
        r = client.post("/v1/attribution", json={"account_ids": ["otlp-att"], "method": "markov",
                                                 "level": "household"})
        assert r.status_code == 200, r.text
    trace_id = r.headers["x-trace-id"]

    def complete(spans):
        mine = [s for s in spans if s.trace_id == trace_id]
        return {"gateway", "attribution"} <= {s.service for s in mine} and _rooted_at_the_gateway(mine)

    receiver.wait_for(complete)
    spans = receiver.trace(trace_id)
    _assert_one_tree(spans)
    by_service = {s.service for s in spans}
    assert {"gateway", "attribution"} <= by_service
    # The gateway exported over HTTP, the services over gRPC, both to the one receiver.
    assert {s.transport for s in spans if s.service == "gateway"} == {"http"}
    assert {s.transport for s in spans if s.service != "gateway"} == {"grpc"}
    # One server span for the request in the gateway, anywhere (FastAPI's own telemetry
    # would add a second, unconnected root in another trace).
    gateway_servers = [s for s in receiver.spans if s.service == "gateway" and s.kind == SPAN_KIND_SERVER
                       and s.attributes.get("http.route") == "/v1/attribution"]   # never the raw path
    assert [s.trace_id for s in gateway_servers] == [trace_id]
    server = [s for s in spans if s.service == "attribution" and s.kind == SPAN_KIND_SERVER]
    assert [s.name for s in server] == ["hearth.attribution.v1.AttributionService/Attribute"]
    for s in spans:
        assert s.resource["service.version"] and s.resource["service.namespace"] == "hearth"
        assert s.resource["deployment.environment"] == "e2e"   # OTEL_RESOURCE_ATTRIBUTES honoured


def test_deletion_fan_out_joins_the_request_trace(traced_mesh):
    mesh, receiver = traced_mesh
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": "otlp-del"},
                                            "reason": "gdpr_art17"})
        assert r.status_code == 202, r.text
        job_id, trace_id = r.json()["job_id"], r.headers["x-trace-id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/delete/{job_id}").json()["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, "deletion did not finish"
            time.sleep(0.05)
        assert client.get(f"/v1/delete/{job_id}").json()["state"] == "completed"

    erasing = {"attribution", "feedback", "clustering"}

    def complete(spans):
        mine = [s for s in spans if s.trace_id == trace_id]
        erased = {s.service for s in mine if s.name.endswith("/Erase") and s.kind == SPAN_KIND_SERVER}
        return erased == erasing and _rooted_at_the_gateway(mine)

    receiver.wait_for(complete)
    spans = receiver.trace(trace_id)
    _assert_one_tree(spans)
    erase_servers = [s for s in spans if s.name.endswith("/Erase") and s.kind == SPAN_KIND_SERVER]
    assert {s.service for s in erase_servers} == erasing
    assert all(s.attributes.get("hearth.job_id") == job_id for s in erase_servers)
    advance = [s for s in spans if s.name == "deletion.advance"]
    assert advance and all(s.service == "privacy" and s.attributes["hearth.job_id"] == job_id
                           for s in advance)
    # The fan-out hangs under the RequestDeletion server span of the privacy service.
    by_id = {s.span_id: s for s in spans}
    request_span = by_id[advance[0].parent_span_id]
    assert request_span.name.endswith("/RequestDeletion") and request_span.kind == SPAN_KIND_SERVER
    # No part of this deletion's work started a trace of its own anywhere in the mesh
    # (the GET /v1/delete/{job} polls are requests of their own, with their own traces).
    strays = [s for s in receiver.spans if s.attributes.get("hearth.job_id") == job_id
              and (s.name.endswith("/Erase") or s.name == "deletion.advance") and s.trace_id != trace_id]
    assert strays == []


def test_every_process_logs_json_and_the_gateway_logs_each_request_with_its_trace_id(traced_mesh):
    mesh, _receiver = traced_mesh
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        r = client.get("/v1/household/otlp-log-acct")
    assert r.status_code == 404
    trace_id = r.headers["x-trace-id"]
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:
        lines = {p.stem: p.read_text().splitlines() for p in mesh.log_dir.glob("*.log")}
        access = [json.loads(line) for line in lines["gateway"] if '"hearth.access"' in line]
        mine = [a for a in access if a.get("trace_id") == trace_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(lines) >= {"gateway", "clustering", "attribution", "privacy", "feedback"}
    for process, text in lines.items():
        for line in text:
            record = json.loads(line)       # uvicorn's own lines included: no plain text
            assert {"ts", "level", "logger", "msg"} <= record.keys(), (process, line)
    assert any(json.loads(line)["logger"].startswith("uvicorn") for line in lines["gateway"])
    (entry,) = mine
    # The route template, never the raw path (it holds the account id).
    assert entry["route"] == "/v1/household/{account_id}" and entry["status"] == 404
    assert entry["method"] == "GET" and entry["duration_ms"] > 0
    assert "otlp-log-acct" not in json.dumps(entry)


def test_the_gateway_exports_its_last_spans_when_it_stops(tmp_path):
    """A batch not yet due is exported when the gateway stops on SIGTERM. uvicorn ends
    its graceful shutdown by raising the caught SIGTERM again, so the process dies by the
    signal and no interpreter-exit hook runs: until session 20 the gateway's last batch —
    the root span of every trace in it — was lost at every stop (the services' was
    flushed). A schedule delay of 10 minutes: nothing is exported unless flushed."""
    from services.testing.mesh import Mesh, write_api_key

    receiver = OtlpReceiver().start()
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs", extra_env={
        "HEARTH_TRACE_EXPORT": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.http_port}"})
    mesh.data_dir.mkdir(parents=True)
    write_api_key(mesh.data_dir / "gateway-keys.json", "otlp-admin", "admin")
    try:
        # The gateway alone: a request refused with 401 needs no service, and is traced.
        mesh.start_listening(["gateway"])

        def refused():
            assert mesh.processes["gateway"].poll() is None, mesh.log_tail("gateway")
            try:
                r = httpx.get(mesh.url + "/v1/household/acc-1", headers={"X-API-Key": "hk_wrong"}, timeout=5)
            except httpx.HTTPError:
                return None
            return r if r.status_code == 401 else None

        r = wait_for(refused, what="the gateway answering")
        trace_id = r.headers["x-trace-id"]
        assert not [s for s in receiver.spans if s.trace_id == trace_id]   # still in the batch
        mesh.stop_process("gateway")   # SIGTERM; returns once the process has exited
        spans = wait_for(lambda: [s for s in receiver.spans if s.trace_id == trace_id], timeout_s=10,
                         what="the gateway's span of the last request")
        assert {(s.service, s.kind) for s in spans} == {("gateway", SPAN_KIND_SERVER)}
    finally:
        mesh.stop()
        receiver.stop()
