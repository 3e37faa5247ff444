"""The Envoy edge's external authorizer (``/v1/edge/authorize/<package.Service>/<Method>``).

The optional Envoy front proxy (deploy/helm/hearth/templates/envoy.yaml) transcodes
HTTP/JSON to gRPC and sends the call straight to a service. The services accept only
calls that carry a principal signed with the mesh key, which Envoy does not hold; so
Envoy's ``ext_authz`` filter asks this route first, with the caller's credentials
(``X-API-Key`` or ``Authorization: Bearer``) and the gRPC path it is about to call
appended to the prefix. The gateway authenticates the caller as for its own routes,
checks the permission matrix for that RPC (the same one the service enforces) and
answers 200 with the principal's signed metadata (``x-hearth-principal``,
``x-hearth-role``, ``x-hearth-token``), which Envoy adds to the upstream call; a
refusal is the gateway's usual 401/403 JSON, which Envoy returns to the client.

Why the gateway and not Envoy alone: one place holds the API keys, the JWT settings and
the permission matrix, so an Envoy-routed call can never be allowed what the gateway
would refuse. The response carries a signed token only for an RPC the caller may make.

Served on a listener of its own (HEARTH_EDGE_AUTHORIZER_PORT), never on the public port:
the answer is a mesh token, which Envoy adds to the call it makes, but a client that
asked the route itself would get the token and could call a service port directly, past
the gateway's rate limits (and the edge's). Until session 19 the route was on the public
port. ``ListenerSplit`` keeps the two apart inside the one process (one app, one event
loop, two sockets); the chart's NetworkPolicy lets only the Envoy pods reach the port.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response

from gateway.errors import error_response
from services.common import permissions
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.identity import Role, SecurityEvent, report_security_event

PREFIX = "/v1/edge/authorize"
# /<package.Service>/<Method>, e.g. /hearth.clustering.v1.ClusteringService/GetHousehold
# The target of a refusal for an RPC missing from the permission matrix (metrics, audit).
UNKNOWN_RPC_TARGET = "rpc <not in the matrix>"
GRPC_PATH = re.compile(r"^/(hearth\.[a-z]+\.v1\.[A-Za-z]+)/([A-Za-z]+)$")


def router(authenticator, limiter) -> APIRouter:
    api = APIRouter()

    # Envoy's ext_authz sends the original method (POST for gRPC) and the path after the
    # prefix; accept the verbs it may forward.
    @api.api_route(PREFIX + "/{grpc_path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"],
                   include_in_schema=False)
    async def authorize(grpc_path: str, request: Request) -> Response:
        full_method = "/" + grpc_path.split("?", 1)[0]
        target = f"rpc {full_method}"
        # Credentials first: an anonymous caller learns nothing about which paths exist.
        who = authenticator.authenticate(request.headers, target)
        if not GRPC_PATH.match(full_method):
            raise InvalidArgument("must be /<hearth package.Service>/<Method>", "path")
        if who.role == Role.SERVICE:
            # The edge is for clients; service principals call each other directly.
            raise PermissionDenied(f"{who.id}: service principals do not call through the edge", "principal")
        permission = permissions.rpc_permission(full_method)
        if permission is None or not permissions.principal_allowed(who, permission):
            # The gateway's refusal, reported as such: audited (coalesced per principal,
            # reason and target like its route refusals), where authorize_rpc would name
            # the RPC's service, whose events the gateway's audit listener skips. An RPC
            # not in the matrix is reported under one fixed target, so the metric's
            # label values are the matrix's RPCs, never a method name a client made up.
            report_security_event(SecurityEvent(
                "permission_denied", "gateway", "not_in_matrix" if permission else "unmapped_target",
                who.id, who.role.value, target if permission else UNKNOWN_RPC_TARGET))
            raise PermissionDenied(f"role {who.role.value} may not call {full_method}", "")
        await limiter.check(who, target)
        return Response(status_code=200, headers=dict(who.metadata()))

    return api


class ListenerSplit:
    """Outermost ASGI layer when the authorizer runs: on ``authorizer_port`` only the
    authorizer's paths are served, on every other port (the public one) never; the
    other side gets the usual JSON 404, as for a path that does not exist. The port is the
    listening socket's own (``scope["server"]``), which a client cannot choose."""

    def __init__(self, app, authorizer_port: int) -> None:
        self.app = app
        self.authorizer_port = authorizer_port
        self._not_found = error_response(404, "not_found", "Not Found")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            server = scope.get("server") or (None, None)
            on_authorizer = server[1] == self.authorizer_port
            if on_authorizer != scope["path"].startswith(PREFIX + "/"):
                await self._not_found(scope, receive, send)
                return
        await self.app(scope, receive, send)
