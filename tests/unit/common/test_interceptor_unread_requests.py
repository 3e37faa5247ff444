"""A unary call's message is read only after its caller is authenticated (session 22;
docs/security.md, "Attacker's review (session 21)", mended item 7): the interceptor serves
every unary method with a request-streaming handler, so an anonymous caller's message —
up to the receive limit, HEARTH_GRPC_MAX_MESSAGE_BYTES — is never read nor deserialised,
while the answers, metrics and audit records stay what they were. Through a real server
built by build_server and a real channel. (tests/security/test_costly_requests.py
measures the service process's memory.)"""

from __future__ import annotations

import json
import threading

import grpc
import pytest
from prometheus_client import REGISTRY

from hearth.clustering.v1 import clustering_pb2 as cpb
from services.common import identity, tls
from services.common.identity import Principal, Role
from services.common.server import HearthInterceptor
from tests.helpers.interceptor import serving_clustering_methods

SERVICE = "t-unread"
METHOD = "/hearth.clustering.v1.ClusteringService/AssignSession"   # the service role's, not an analyst's


class _Counting:
    """The method's request deserialiser, counting what it was given."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, data: bytes):
        with self.lock:
            self.calls += 1
        return cpb.AssignSessionRequest.FromString(data)


@pytest.fixture
def served():
    deserialize = _Counting()

    def assign(request: cpb.AssignSessionRequest, context) -> cpb.AssignSessionResponse:
        return cpb.AssignSessionResponse(assignment=cpb.Assignment(person_id=request.account_id))

    with serving_clustering_methods(SERVICE, {"AssignSession": grpc.unary_unary_rpc_method_handler(
            assign, request_deserializer=deserialize,
            response_serializer=cpb.AssignSessionResponse.SerializeToString)}, b"u" * 32) as served:
        served.channel.address = served.address
        yield served.channel, deserialize, served.transport, served.sink


def _count(code: str) -> float:
    return REGISTRY.get_sample_value("hearth_rpc_requests_total",
                                     {"service": SERVICE, "method": "AssignSession", "code": code}) or 0.0


def _call(channel, request: bytes, metadata=()):
    return channel.unary_unary(METHOD, response_deserializer=cpb.AssignSessionResponse.FromString)(
        request, metadata=metadata, timeout=10)


def test_a_unary_method_is_served_by_a_request_streaming_handler():
    interceptor = HearthInterceptor("t-unread-kind")
    details = type("Details", (), {"method": METHOD})()
    for factory, streaming_response in ((grpc.unary_unary_rpc_method_handler, False),
                                        (grpc.unary_stream_rpc_method_handler, True)):
        wrapped = interceptor.intercept_service(lambda _d, f=factory: f(lambda r, c: r), details)
        assert wrapped.request_streaming and wrapped.response_streaming == streaming_response
        interceptor._wrapped.clear()


def test_an_anonymous_callers_message_is_never_deserialised_and_refused_as_before(served):
    channel, deserialize, transport, sink = served
    request = cpb.AssignSessionRequest(account_id="hh-anon", session_id="s" * 100_000).SerializeToString()
    refused0 = _count("UNAUTHENTICATED")
    for metadata in ((), (("x-hearth-principal", "svc:gateway"), ("x-hearth-role", "service"),
                          ("x-hearth-token", "v2.t-unread.9999999999.forged"))):
        with pytest.raises(grpc.RpcError) as refused:
            _call(channel, request, metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no principal in request metadata" in _call_details(channel, request)
    assert deserialize.calls == 0
    assert _count("UNAUTHENTICATED") - refused0 == 3
    assert sink.flush(5)
    records = transport.records[-3:]
    assert [(r.event_type, r.outcome) for r in records] == [("authentication_failure", "denied")] * 3
    assert all(json.loads(r.details_json)["code"] == "UNAUTHENTICATED" for r in records)
    assert [r.resource for r in records] == [""] * 3   # the message, never read, names nothing


def _call_details(channel, request: bytes) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        _call(channel, request)
    return refused.value.details()


def test_an_authenticated_callers_message_is_read_once_and_answered(served):
    channel, deserialize, transport, sink = served
    metadata = identity.service_principal("gateway").metadata(SERVICE)
    answer = _call(channel, cpb.AssignSessionRequest(account_id="hh-1", session_id="s1").SerializeToString(), metadata)
    assert answer.assignment.person_id == "hh-1"
    assert deserialize.calls == 1
    assert sink.flush(5)
    assert (transport.records[-1].event_type, transport.records[-1].resource) == ("assign", "household:hh-1")


def test_a_caller_without_the_right_is_denied_as_before_and_audited_with_the_household(served):
    channel, deserialize, transport, sink = served
    metadata = Principal("an-analyst", Role.ANALYST).metadata(SERVICE)
    with pytest.raises(grpc.RpcError) as denied:
        _call(channel, cpb.AssignSessionRequest(account_id="hh-2", session_id="s1").SerializeToString(), metadata)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sink.flush(5)
    record = transport.records[-1]
    assert (record.event_type, record.outcome, record.principal, record.resource) == (
        "permission_denied", "denied", "an-analyst", "household:hh-2")


def test_an_authenticated_call_without_a_message_is_invalid_not_internal(served):
    channel, _deserialize, _transport, _sink = served
    metadata = identity.service_principal("gateway").metadata(SERVICE)
    # A client stream on the unary method that sends nothing: no message to answer.
    with pytest.raises(grpc.RpcError) as refused:
        channel.stream_unary(METHOD)(iter(()), metadata=metadata, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exactly one request message" in refused.value.details()


# 16 KiB, and a 20 KiB message over it: below HTTP/2's initial window (65,535 bytes), so the
# refused message is sent whole before the server's answer. A message larger than the window
# answered unread, on a synchronous channel closed after it while other threads run, is what
# crashes grpcio 1.75-1.78's client core (docs/security.md, "grpcio's client core crashed
# once"; bench.grpc_refused_unread) — the limit is what this test checks, not that path.
LIMIT_BYTES = 16 * 1024


@pytest.fixture
def small_limit():
    tls.configure(None, max_message_bytes=LIMIT_BYTES)
    try:
        yield
    finally:
        tls._configured = None


def test_a_message_over_the_limit_is_resource_exhausted_at_both_ends(small_limit, served):
    """HEARTH_GRPC_MAX_MESSAGE_BYTES bounds what a server reads and what a client sends;
    responses (exports) keep 64 MiB."""
    channel, deserialize, _transport, _sink = served
    options = dict(tls.channel_options())
    assert options["grpc.max_send_message_length"] == LIMIT_BYTES
    assert options["grpc.max_receive_message_length"] == tls.RESPONSE_MAX_BYTES == 64 * 1024 * 1024
    metadata = identity.service_principal("gateway").metadata(SERVICE)
    big = cpb.AssignSessionRequest(account_id="hh-3", session_id="s" * (20 * 1024)).SerializeToString()
    with pytest.raises(grpc.RpcError) as refused:   # the server's core: never handed to the method
        _call(channel, big, metadata)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in refused.value.details()
    assert deserialize.calls == 0
    with grpc.insecure_channel(channel.address, options=tls.channel_options()) as limited:
        with pytest.raises(grpc.RpcError) as unsent:   # the client's channel: never sent
            limited.unary_unary(METHOD)(big, metadata=metadata, timeout=10)
        assert unsent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CLIENT: Sent message larger than max" in unsent.value.details()
