"""HTTP routes, one module per backing service. Each module's ``router(clients, access)``
returns an APIRouter; ``access("METHOD /path")`` is the dependency that authenticates the
caller and checks the permission matrix for that route."""

from __future__ import annotations

from fastapi import APIRouter, Path

from gateway.lean import LeanRoute
from services.common.ids import ID_PATTERN, MAX_ID_CHARS

ACCOUNT_PATH = Path(..., min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)

def api_router() -> APIRouter:
    """The router every route module uses: its JSON-body routes get the lean handler
    (gateway/lean.py), the rest FastAPI's."""
    return APIRouter(route_class=LeanRoute)
