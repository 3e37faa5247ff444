"""The gateway starts a trace of its own for every request; a client's ``traceparent`` is
a span link, never the parent (gateway/app.py ``client_trace_link``). Until session 19 the
client's trace id became the trace id of the request's audit records."""

from __future__ import annotations

import asyncio

import httpx
from opentelemetry import baggage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from gateway.app import ObserveMiddleware
from services.common import telemetry

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _run(client: httpx.AsyncClient, *calls):
    async def go():
        async with client:
            return [await call(client) for call in calls]
    return asyncio.run(go())


def _gateway(sampler=None):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**({"sampler": sampler} if sampler else {}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: dict = {}

    async def app(scope, receive, send):
        # What the route (and the audit record it makes, and the gRPC metadata it sends) sees.
        seen["trace_id"] = telemetry.current_trace_id()
        seen["baggage"] = dict(baggage.get_all())
        seen["carrier"] = telemetry.context_carrier()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    observed = ObserveMiddleware(app, provider.get_tracer("t"), max_body_bytes=1024, access_log=False)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=observed), base_url="http://gw"), exporter, seen


def test_a_client_traceparent_is_a_link_not_the_trace_of_the_request():
    client, exporter, seen = _gateway()
    response = _run(client, lambda c: c.get("/v1/x", headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        "tracestate": "vendor=opaque", "baggage": "account_id=acc-1"}))[0]
    assert response.status_code == 200
    (span,) = exporter.get_finished_spans()
    ours = format(span.context.trace_id, "032x")
    assert ours != CLIENT_TRACE and span.parent is None            # a root of its own
    assert response.headers["x-trace-id"] == ours == seen["trace_id"]   # what the audit record gets
    (link,) = span.links
    assert format(link.context.trace_id, "032x") == CLIENT_TRACE
    assert format(link.context.span_id, "016x") == CLIENT_SPAN
    assert link.attributes["hearth.link"] == "client_traceparent"
    # Nothing else of the client's context rides into the mesh.
    assert seen["baggage"] == {}
    assert CLIENT_TRACE not in str(seen["carrier"]) and "baggage" not in seen["carrier"]
    assert "vendor=opaque" not in str(seen["carrier"])


def test_the_gateways_sampler_decides_not_the_clients_sampled_flag():
    client, exporter, _ = _gateway(ParentBased(TraceIdRatioBased(0.0)))   # the gateway samples nothing
    _run(client, *[lambda c: c.get("/v1/x", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})] * 5)
    assert exporter.get_finished_spans() == ()


def test_without_or_with_a_malformed_traceparent_there_is_no_link():
    client, exporter, _ = _gateway()
    _run(client, lambda c: c.get("/v1/x"), lambda c: c.get("/v1/x", headers={"traceparent": "00-zz-yy-01"}))
    assert [len(s.links) for s in exporter.get_finished_spans()] == [0, 0]
