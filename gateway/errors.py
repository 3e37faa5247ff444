"""The one table from gRPC status codes to HTTP statuses, and the JSON error body."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from services.common.errors import ERROR_CODE_KEY, ERROR_FIELD_KEY, HearthError, status_for

HTTP_BY_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    # An AioRpcError with CANCELLED is never the HTTP client's doing (a client that goes away
    # cancels the handler's task, which raises CancelledError instead): the upstream or its
    # transport dropped the call — a stopping server's core cancels calls it had not yet
    # handed to a handler (services/common/server.Drain). Like UNAVAILABLE: 503, retry.
    grpc.StatusCode.CANCELLED: 503,
}


# Seconds a client should wait before retrying a 503 (a service, its database or a peer
# is down or restarting: docs/operations.md, "Outages").
RETRY_AFTER_S = 2

# What a client is told when the transport (not a service) failed a call.
TRANSPORT_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "a service this request needs is unavailable; retry after Retry-After seconds",
    grpc.StatusCode.DEADLINE_EXCEEDED: "a service this request needs did not answer in time",
}


def error_response(status: int, code: str, message: str, field: str = "",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return JSONResponse({"error": {"code": code, "field": field, "message": message}},
                        status_code=status, headers=headers)


def _pairs(metadata) -> list[tuple[str, str]]:
    # grpc.aio.Metadata iterates as (key, value) pairs, like the sync API's tuples.
    return [(item[0], item[1]) for item in metadata or ()]


def rpc_error_field(exc: grpc.aio.AioRpcError) -> str:
    """The request field a service's error names (empty when it names none)."""
    return {k: v for k, v in _pairs(exc.trailing_metadata())}.get(ERROR_FIELD_KEY, "")


def from_rpc_error(exc: grpc.aio.AioRpcError) -> JSONResponse:
    trailing = {k: v for k, v in _pairs(exc.trailing_metadata())}
    code = exc.code()
    status = HTTP_BY_GRPC.get(code, 502)
    message = exc.details() or code.name.lower()
    if status >= 500 and code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        message = "upstream error"  # never leak internals of a failing service
    elif status >= 500 and ERROR_CODE_KEY not in trailing:
        # Not a service's own error (those carry their code) but gRPC's transport: its text
        # names internal addresses ("failed to connect to all addresses; ... ipv4:10.0.3.7:50051:
        # Connection refused"), which a client must not learn.
        message = TRANSPORT_MESSAGES.get(code, "upstream error")
    return error_response(status, trailing.get(ERROR_CODE_KEY, code.name.lower()), message,
                          trailing.get(ERROR_FIELD_KEY, ""))


def from_hearth_error(exc: HearthError) -> JSONResponse:
    status = HTTP_BY_GRPC.get(status_for(exc), 500)
    headers = {"WWW-Authenticate": "ApiKey"} if status == 401 else None
    return error_response(status, exc.code, exc.message, exc.field, headers)
