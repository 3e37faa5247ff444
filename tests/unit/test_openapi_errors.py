"""/openapi.json declares every status each route can answer, with the shared error body.

Until session 19 each route listed its errors by hand (a shared dict) and none declared
408 (head/body deadlines), 431 (head bound), 500, 502 (an unmapped gRPC code), 504 (a
service's deadline) or the 404/409/501 a service's error maps to, though the gateway
answered them on every route. The expected sets here are computed from the error tables
(services/common/errors.py, gateway/errors.HTTP_BY_GRPC) and the statuses the transport
and middleware produce, not from the generator (gateway/errors.declare_errors)."""

from __future__ import annotations

import grpc
import pytest
from fastapi.routing import APIRoute

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.errors import ERROR_STATUSES, HTTP_BY_GRPC
from services.common import errors as service_errors

# Produced outside any route's code, on every route: the head deadline and the body
# deadline (408), the head bound (431), the Content-Length bound (413), the last-resort
# handler (500).
ANY_ROUTE = {408, 413, 431, 500}
# The gateway's own refusals on an authenticated route: unparseable body, credentials,
# permission matrix, validation, rate limit.
GATEWAY_REFUSALS = {400, 401, 403, 422, 429}


def _hearth_error_statuses() -> set[int]:
    found, todo = set(), [service_errors.HearthError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        found.add(HTTP_BY_GRPC.get(service_errors.status_for(cls.__new__(cls)), 500))
    return found


def _expected(route: APIRoute) -> set[int]:
    if route.path == "/health":   # no credentials, no service call of its own
        return ANY_ROUTE | {503}
    from_grpc = {status for code, status in HTTP_BY_GRPC.items() if status >= 400}
    unmapped = {502} if set(grpc.StatusCode) - set(HTTP_BY_GRPC) else set()
    return ANY_ROUTE | GATEWAY_REFUSALS | from_grpc | unmapped | _hearth_error_statuses()


@pytest.fixture(scope="module")
def app_and_schema():
    app = create_app(GatewaySettings())
    return app, app.openapi()


def test_every_route_declares_every_status_it_can_answer(app_and_schema):
    app, schema = app_and_schema
    routes, todo = [], list(app.routes)
    while todo:   # routers are included without a prefix (gateway/app.py)
        route = todo.pop()
        if isinstance(route, APIRoute) and route.include_in_schema:
            routes.append(route)
        elif hasattr(route, "original_router"):
            todo += route.original_router.routes
    assert len(routes) >= 19
    for route in routes:
        for method in route.methods:
            responses = schema["paths"][route.path][method.lower()]["responses"]
            declared = {int(status) for status in responses if int(status) >= 400}
            missing = _expected(route) - declared
            assert not missing, f"{method} {route.path} does not declare {sorted(missing)}"
            assert declared <= set(ERROR_STATUSES) | {503}, f"{method} {route.path}: {sorted(declared)}"


def test_error_responses_carry_the_shared_body_and_retry_after(app_and_schema):
    _, schema = app_and_schema
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    assert set(schema["components"]["schemas"]["ErrorOut"]["properties"]) == {"error"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]   # FastAPI's 422, never sent
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) < 400 or (path, status) == ("/health", "503"):
                    continue
                assert response["content"]["application/json"]["schema"] == error_ref, (method, path, status)
                assert response["description"], (method, path, status)
            for status in ("429", "503"):
                if status in operation["responses"] and path != "/health":
                    assert "Retry-After" in operation["responses"][status]["headers"], (method, path, status)


def test_route_specific_descriptions_are_kept(app_and_schema):
    _, schema = app_and_schema
    household = schema["paths"]["/v1/household/{account_id}"]["get"]["responses"]
    assert household["404"]["description"] == "unknown account"
    assert household["504"]["description"] == ERROR_STATUSES[504]
