"""Who may do what: the ONE permission matrix, enforced at the gateway and in every
service (defence in depth).

Placeholder until the access-control issue lands: every authenticated principal may call
everything. ``authorize_rpc`` is called by the server interceptor for every RPC and
``authorize_route`` by the gateway for every route; both raise PermissionDenied.
"""

from __future__ import annotations

from services.common.identity import Principal


def authorize_rpc(principal: Principal, full_method: str) -> None:
    """Raise PermissionDenied unless ``principal`` may call ``/pkg.Service/Method``."""
    return None


def authorize_route(principal: Principal, route: str) -> None:
    """Raise PermissionDenied unless ``principal`` may call ``"METHOD /path/template"``."""
    return None
