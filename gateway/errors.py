"""The one table from gRPC status codes to HTTP statuses, and the JSON error body."""

from __future__ import annotations

import json
import logging
import re
import time

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
    # A deadline passing does not undo what the service did meanwhile: four of five
    # 10,000-event posts that answered 504 had stored their events (attack25), and a caller
    # cannot tell which. Said, so a client resends instead of assuming nothing happened.
    grpc.StatusCode.DEADLINE_EXCEEDED: "a service this request needs did not answer in time; the request may "
                                       "still have taken effect (an event batch sent again counts its stored "
                                       "events as duplicates)",
}


# Every status the gateway answers with the JSON error body (models.ErrorOut), and what it
# means; the one source of the error responses /openapi.json declares (declare_errors).
ERROR_STATUSES: dict[int, str] = {
    400: "the body is not parseable (e.g. nested too deeply, or Content-Encoding set)",
    401: "missing or invalid credentials",
    403: "the caller's role may not use this route",
    404: "not found",
    408: "the request head (HEARTH_HEAD_TIMEOUT_S) or body (HEARTH_BODY_TIMEOUT_S) did not "
         "arrive in time; the connection is closed",
    409: "conflicts with the current state",
    412: "a precondition failed (e.g. consent withdrawn)",
    413: "request body too large",
    422: "invalid input; `error.field` names the field",
    429: "rate limit exceeded; see the Retry-After header",
    431: "request head (request line and headers) too large; the connection is closed",
    500: "internal error",
    501: "not implemented by the service behind this route",
    502: "a service behind this route failed",
    503: "a service is unavailable, or the gateway is at capacity; retry after Retry-After seconds",
    504: "a service behind this route did not answer in time; the request may still have taken effect",
}
# Answered on any route, before or around routing: the transport (408, 431,
# gateway/transport.py), the body deadline (408), the Content-Length bound (413) and the
# last-resort handler (500) of the outer middleware.
TRANSPORT_STATUSES = frozenset({408, 413, 431, 500})
# A status with no gRPC code (a code missing from HTTP_BY_GRPC) is a 502, "upstream error".
UNMAPPED_RPC_STATUS = 502
RESPONSE_HEADERS = {
    401: {"WWW-Authenticate": "the accepted scheme"},
    429: {"Retry-After": "seconds to wait before retrying"},
    503: {"Retry-After": "seconds to wait before retrying"},
}


def route_error_statuses() -> frozenset[int]:
    """Every error status of a route that authenticates its caller and calls a service:
    the transport's, the gateway's own refusals (400 unparseable body, 401, 403, 422, 429)
    and whatever a service's gRPC status maps to (HTTP_BY_GRPC, else 502)."""
    from_services = {status for status in HTTP_BY_GRPC.values() if status >= 400}
    return frozenset(TRANSPORT_STATUSES | {400, 401, 403, 422, 429} | from_services | {UNMAPPED_RPC_STATUS})


def declare_errors(schema: dict, authenticated: set[str]) -> dict:
    """Add to every operation of an OpenAPI ``schema`` each error status it can answer, with
    the shared error body: ``route_error_statuses()`` on the routes in ``authenticated``
    ("METHOD /path"), ``TRANSPORT_STATUSES`` on the others. A route's own description of a
    status (e.g. 404 "unknown account") is kept; the body is always the error schema."""
    from gateway.models import ErrorOut

    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in error_schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("ErrorOut", error_schema)
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    statuses_of = {True: sorted(route_error_statuses()), False: sorted(TRANSPORT_STATUSES)}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status in statuses_of[f"{method.upper()} {path}" in authenticated]:
                declared = responses.get(str(status), {})
                # The body is always ErrorOut: FastAPI's default 422 (HTTPValidationError)
                # is not what the gateway sends (gateway/app.py on_validation_error).
                response = {"description": declared.get("description") or ERROR_STATUSES[status],
                            "content": body}
                if status in RESPONSE_HEADERS:
                    response["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                                           for name, text in RESPONSE_HEADERS[status].items()}
                responses[str(status)] = response
    text = json.dumps(schema.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}" not in text and unused in components and not any(
                f"#/components/schemas/{unused}" in json.dumps(other) for name, other in components.items()
                if name != unused):
            del components[unused]
    return schema


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


# gRPC's own RESOURCE_EXHAUSTED for a message over a limit (HEARTH_GRPC_MAX_MESSAGE_BYTES):
# the request, refused by the gateway's channel before it is sent or by the service's core
# before it is read, is the client's (413, never "retry later"); a response over the
# gateway's receive limit is the service's (502).
_REQUEST_TOO_LARGE = re.compile(r"(?:CLIENT: Sent|SERVER: Received) message larger than max \((\d+) vs\. (\d+)\)")
_RESPONSE_TOO_LARGE = "CLIENT: Received message larger than max"


log = logging.getLogger("hearth.gateway")
# An UNAUTHENTICATED from a service is never about the HTTP client's credentials (the
# gateway checked those itself): the service refused the gateway's service token — their
# clocks disagree by more than the tokens' skew (30 s) or the mesh's keys do not match
# (docs/operations.md, "Clock steps"). Until session 24 the client got 401 with the
# internal header's name ("x-hearth-token: invalid service token"): a client told its key
# was wrong, and no 5xx for the availability alerts while every request failed. Now 503
# with Retry-After, and a warning here at most once a minute.
_MESH_AUTH_LOG_EVERY_S = 60.0
_mesh_auth_logged = [float("-inf")]


def _mesh_auth_refused(exc: grpc.aio.AioRpcError) -> JSONResponse:
    now = time.monotonic()
    if now - _mesh_auth_logged[0] >= _MESH_AUTH_LOG_EVERY_S:
        _mesh_auth_logged[0] = now
        log.warning("a service refused the gateway's service token (%s): its clock or the mesh's keys disagree "
                    "with the gateway's; answering 503", exc.details() or "UNAUTHENTICATED")
    return error_response(503, "unavailable", TRANSPORT_MESSAGES[grpc.StatusCode.UNAVAILABLE])


def from_rpc_error(exc: grpc.aio.AioRpcError) -> JSONResponse:
    trailing = {k: v for k, v in _pairs(exc.trailing_metadata())}
    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return _mesh_auth_refused(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and ERROR_CODE_KEY not in trailing:
        details = exc.details() or ""
        too_large = _REQUEST_TOO_LARGE.search(details)
        if too_large:
            return error_response(413, "payload_too_large",
                                  f"the request makes a message of {too_large.group(1)} bytes to a service, over "
                                  f"the mesh's limit of {too_large.group(2)} (HEARTH_GRPC_MAX_MESSAGE_BYTES)")
        if _RESPONSE_TOO_LARGE in details:
            return error_response(UNMAPPED_RPC_STATUS, "resource_exhausted", "upstream error")
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
