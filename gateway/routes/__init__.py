"""HTTP routes, one module per backing service. Each module's ``router(clients, access)``
returns an APIRouter; ``access("METHOD /path")`` is the dependency that authenticates the
caller and checks the permission matrix for that route."""

from __future__ import annotations

from fastapi import APIRouter, Path

from gateway.lean import LeanRoute
from gateway.models import ID_LENGTH_SCHEMA
from services.common.ids import ID_PATTERN

# The id rule by its pattern alone (gateway/models.py ``Id`` says why).
ACCOUNT_PATH = Path(..., pattern=ID_PATTERN, json_schema_extra=ID_LENGTH_SCHEMA)

def api_router() -> APIRouter:
    """The router every route module uses: its JSON-body routes get the lean handler
    (gateway/lean.py), the rest FastAPI's."""
    return APIRouter(route_class=LeanRoute)
