"""The README lists every HTTP route of the gateway, and every route an operator doc names
(`METHOD /path` in backticks) is one the gateway serves or one the Envoy edge transcodes
(a `google.api.http` rule in protos/)."""

from __future__ import annotations

import re

from fastapi.routing import APIRoute

from gateway.app import create_app
from gateway.config import GatewaySettings
from tests.helpers.operator_docs import ROOT, doc_lines

# Served by other processes: `hearth rollout webhook`, the OTLP receiver of the tests, the
# gateway's metrics port.
OTHER_SERVERS = {"POST /alerts", "POST /v1/traces", "GET /metrics"}
_DOC_ROUTE = re.compile(r"`((?:GET|POST|PUT|DELETE|PATCH)(?:\|(?:GET|POST|PUT|DELETE|PATCH))*) (/[^`?\s]*)[^`]*`")


def _norm(path: str) -> str:
    return re.sub(r"\{[^}]*\}|<[^>]*>", "{}", path)


def _gateway_routes() -> set[str]:
    app = create_app(GatewaySettings(edge_authorizer_port=8099))
    routes, todo = set(), list(app.routes)
    while todo:   # routers are included without a prefix (gateway/app.py)
        route = todo.pop()
        if isinstance(route, APIRoute):
            path = _norm(route.path)
            if any(type(c).__name__ == "PathConvertor" for c in route.param_convertors.values()):
                path = path[:-2] + "{...}"   # the rest of the path, slashes included
            routes |= {f"{method} {path}" for method in route.methods}
        elif hasattr(route, "original_router"):
            todo += route.original_router.routes
    return routes


def _proto_routes() -> set[str]:
    rules = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        for method, path in re.findall(r"\b(get|post|put|delete|patch):\s*\"([^\"]+)\"", proto.read_text()):
            rules.add(f"{method.upper()} {_norm(path)}")
    return rules


def _documented(only: str | None = None) -> list[tuple[str, int, str]]:
    found = []
    for doc, number, line in doc_lines():
        if only in (None, doc):
            for methods, path in _DOC_ROUTE.findall(line):
                found += [(doc, number, f"{method} {_norm(path)}") for method in methods.split("|")]
    return found


def test_the_readme_lists_every_route_of_the_gateway():
    listed = {route for _, _, route in _documented("README.md")}
    public = {r for r in _gateway_routes() if r.split()[1].startswith(("/v1/", "/health"))
              and not r.split()[1].startswith("/v1/edge/")}
    assert len(public) >= 19
    assert sorted(public - listed) == []


def test_every_documented_route_exists():
    known = _gateway_routes() | _proto_routes() | OTHER_SERVERS
    assert len(_proto_routes()) >= 20
    wrong = []
    # A template's parameter matches any one segment (`/v1/household/h1`), `{...}` the rest.
    patterns = [re.compile(re.escape(k).replace(r"\{\.\.\.\}", ".+").replace(r"\{\}", "[^/]+") + "$")
                for k in known]
    for doc, number, route in _documented():
        method, path = route.split(" ", 1)
        # `GET /v1/household` names the route family of `/v1/household/{account_id}`.
        if not any(p.match(route) for p in patterns) \
                and not any(k.startswith(f"{method} {path.rstrip('/')}/") for k in known):
            wrong.append(f"{doc}:{number} {route}")
    assert wrong == []


def test_the_openapi_document_declares_the_conflicts_routes_answer():
    # POST /v1/delete answers 409 for a request_id reused with another scope
    # (docs/privacy.md); its OpenAPI entry did not say so until session 18.
    paths = create_app(GatewaySettings()).openapi()["paths"]
    assert "409" in paths["/v1/delete"]["post"]["responses"]
    assert "409" in paths["/v1/feedback"]["post"]["responses"]
    assert "409" in paths["/v1/experiment"]["put"]["responses"]


def test_the_assign_vector_names_the_feature_schema_the_gateway_sends():
    # The API docs (/docs) said "schema v1" while POST /v1/assign sent a vector as schema 2
    # (session 28, docs28, reading /openapi.json of a running mesh).
    from services.clustering.domain import features

    schemas = create_app(GatewaySettings(edge_authorizer_port=8099)).openapi()["components"]["schemas"]
    described = schemas["AssignIn"]["properties"]["feature_vector"]["description"]
    assert f"schema v{features.FEATURE_SCHEMA_VERSION} " in described
