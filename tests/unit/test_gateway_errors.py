"""The gateway's one error table (gateway/errors.py): what a client is told when a call
to a service fails."""

from __future__ import annotations

import json

import grpc

from gateway.errors import from_rpc_error
from services.common.errors import ERROR_CODE_KEY, ERROR_FIELD_KEY

TRANSPORT_TEXT = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.3.7:50053: "
                  "Failed to connect to remote host: Connection refused")


def _body(exc: grpc.aio.AioRpcError) -> tuple[int, dict]:
    response = from_rpc_error(exc)
    return response.status_code, json.loads(response.body)["error"]


def test_a_transport_failure_is_503_without_the_internal_address():
    status, error = _body(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), details=TRANSPORT_TEXT))
    assert status == 503
    assert error["code"] == "unavailable"
    assert "10.0.3.7" not in error["message"] and "50053" not in error["message"], error
    assert "unavailable" in error["message"]


def test_a_deadline_is_504_without_transport_text():
    status, error = _body(grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), details="Deadline Exceeded"))
    assert status == 504 and error["message"].startswith("a service this request needs did not answer in time; the request may still have taken effect")


def test_a_services_own_unavailable_error_keeps_its_message_and_field():
    trailing = grpc.aio.Metadata((ERROR_CODE_KEY, "unavailable"), (ERROR_FIELD_KEY, "account_id"))
    status, error = _body(grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing,
        details="account_id: feedback is unavailable; no partial export is given"))
    assert status == 503
    assert error == {"code": "unavailable", "field": "account_id",
                     "message": "account_id: feedback is unavailable; no partial export is given"}


def test_a_request_message_over_the_grpc_limit_is_413_not_429():
    """gRPC's own RESOURCE_EXHAUSTED for a message over HEARTH_GRPC_MAX_MESSAGE_BYTES — the
    gateway's channel refusing to send it, or the service's core refusing to read it — is the
    client's request: 413 (a 429 would tell it to retry the same request later)."""
    for details in ("CLIENT: Sent message larger than max (20971525 vs. 16777216)",
                    "SERVER: Received message larger than max (20971525 vs. 16777216)"):
        status, error = _body(grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                                   grpc.aio.Metadata(), details=details))
        assert status == 413 and error["code"] == "payload_too_large", (details, error)
        assert "20971525" in error["message"] and "HEARTH_GRPC_MAX_MESSAGE_BYTES" in error["message"]
    # A response over the gateway's receive limit is the service's doing: 502.
    status, error = _body(grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
        details="CLIENT: Received message larger than max (70000000 vs. 67108864)"))
    assert status == 502 and error["message"] == "upstream error"
    # A service's own RESOURCE_EXHAUSTED (with its error code) keeps its 429.
    status, error = _body(grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
        grpc.aio.Metadata((ERROR_CODE_KEY, "resource_exhausted"), (ERROR_FIELD_KEY, "")), details="busy"))
    assert status == 429


def test_a_service_refusing_the_gateways_service_token_is_503_not_401():
    """clock24: a service whose clock is more than the tokens' skew (30 s) behind the
    gateway's refuses every service token (token_lifetime_too_long), and the client got
    401 `x-hearth-token: invalid service token` — told its own key was wrong, shown an
    internal header, and no 5xx for the availability alerts. The gateway authenticated
    the client itself: this is the mesh's fault, 503 with Retry-After."""
    trailing = grpc.aio.Metadata((ERROR_CODE_KEY, "unauthenticated"), (ERROR_FIELD_KEY, "x-hearth-token"))
    exc = grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), trailing,
                               details="x-hearth-token: invalid service token")
    response = from_rpc_error(exc)
    error = json.loads(response.body)["error"]
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert error["code"] == "unavailable" and error["field"] == ""
    assert "x-hearth-token" not in error["message"] and "token" not in error["message"], error
