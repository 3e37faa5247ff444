"""The server interceptor keeps its per-call promises while building its per-method parts
once (issue #11: the wrapped handler, metric series and the audit details of an RPC are
resolved once per method, the service token's HMAC once per token): through a real
server built by build_server and a real channel, successive calls of one method with
different outcomes each get their own audit record (status, outcome, principal, a fresh
record id, the caller's trace id), their own metric counts and the right status."""

from __future__ import annotations

import json

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common import identity, telemetry
from services.common.errors import InvalidArgument
from services.common.server import HearthInterceptor
from tests.helpers.interceptor import serving_clustering_methods

SERVICE = "t-intercept"
METHOD = "/hearth.clustering.v1.ClusteringService/AssignSession"   # audited as "assign"
TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def served():
    def handler(request: bytes, context) -> bytes:
        if request == b"bad":
            raise InvalidArgument("bad request", "session")
        return request

    with serving_clustering_methods(SERVICE, {"AssignSession": grpc.unary_unary_rpc_method_handler(handler)},
                                    b"s" * 32) as served:
        yield served.channel.unary_unary(METHOD), served.transport, served.sink


def _count(code: str) -> float:
    return REGISTRY.get_sample_value("hearth_rpc_requests_total",
                                     {"service": SERVICE, "method": "AssignSession", "code": code}) or 0.0


def test_every_call_gets_its_own_record_metrics_and_status(served):
    call, transport, sink = served
    metadata = (*identity.service_principal("gateway").metadata(SERVICE),
                ("traceparent", f"00-{TRACE}-b7ad6b7169203331-01"))
    ok0, bad0 = _count("OK"), _count("INVALID_ARGUMENT")
    assert call(b"one", metadata=metadata, timeout=10) == b"one"
    with pytest.raises(grpc.RpcError) as refused:
        call(b"bad", metadata=metadata, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert call(b"two", metadata=metadata, timeout=10) == b"two"
    with pytest.raises(grpc.RpcError) as unauthenticated:   # no token: refused, still audited
        call(b"three", metadata=metadata[:2], timeout=10)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sink.flush(5)

    assert (_count("OK") - ok0, _count("INVALID_ARGUMENT") - bad0) == (2, 1)
    records = transport.records[-4:]
    assert [(r.event_type, r.outcome) for r in records] == [
        ("assign", "success"), ("assign", "failure"), ("assign", "success"),
        ("authentication_failure", "denied")]
    assert [json.loads(r.details_json)["code"] for r in records] == [
        "OK", "INVALID_ARGUMENT", "OK", "UNAUTHENTICATED"]
    assert all(json.loads(r.details_json)["rpc"] == METHOD.lstrip("/") for r in records)
    assert [r.principal for r in records] == ["svc:gateway"] * 4
    assert json.loads(records[-1].details_json)["authenticated"] == "false"
    assert "authenticated" not in json.loads(records[0].details_json)
    assert all(r.trace_id == TRACE for r in records[:3])
    assert len({r.record_id for r in records}) == 4


def test_a_changed_handler_for_a_method_is_wrapped_afresh():
    interceptor = HearthInterceptor("t-rewrap")
    details = type("Details", (), {"method": METHOD})()
    first = grpc.unary_unary_rpc_method_handler(lambda r, c: b"first")
    second = grpc.unary_unary_rpc_method_handler(lambda r, c: b"second")
    a = interceptor.intercept_service(lambda _d: first, details)
    assert interceptor.intercept_service(lambda _d: first, details) is a   # built once per method
    b = interceptor.intercept_service(lambda _d: second, details)
    assert b is not a
    assert interceptor.intercept_service(lambda _d: None, details) is None   # unknown method: no handler


@pytest.fixture
def own_pseudonym_key():
    previous = telemetry._PSEUDONYM_KEY
    yield
    telemetry._PSEUDONYM_KEY = previous
    telemetry._PSEUDONYMS.clear()


def test_cached_pseudonyms_follow_the_key(own_pseudonym_key):
    telemetry.configure_pseudonym_key("key one")
    first = telemetry.pseudonym("svc:gateway", cache=True)
    assert first == telemetry.pseudonym("svc:gateway") == telemetry.pseudonym("svc:gateway", cache=True)
    telemetry.configure_pseudonym_key("key two")
    second = telemetry.pseudonym("svc:gateway", cache=True)
    assert second != first and second == telemetry.pseudonym("svc:gateway")
    assert "hh-1" not in telemetry._PSEUDONYMS
    telemetry.pseudonym("hh-1")   # household ids are not kept in memory
    assert "hh-1" not in telemetry._PSEUDONYMS
