"""HTTP routes, one module per backing service. Each module's ``router(clients, access)``
returns an APIRouter; ``access("METHOD /path")`` is the dependency that authenticates the
caller and checks the permission matrix for that route."""

from __future__ import annotations

from fastapi import APIRouter, Path

from gateway import models
from gateway.lean import LeanRoute
from services.common.ids import ID_PATTERN, MAX_ID_CHARS

ACCOUNT_PATH = Path(..., min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)

ERROR_RESPONSES = {
    401: {"model": models.ErrorOut, "description": "missing or invalid credentials"},
    400: {"model": models.ErrorOut, "description": "the body is not parseable (e.g. nested too deeply)"},
    403: {"model": models.ErrorOut, "description": "the caller's role may not use this route"},
    412: {"model": models.ErrorOut, "description": "a precondition failed (e.g. consent withdrawn)"},
    413: {"model": models.ErrorOut, "description": "request body too large"},
    422: {"model": models.ErrorOut, "description": "invalid input; `error.field` names the field"},
    429: {"model": models.ErrorOut, "description": "rate limit exceeded; see the Retry-After header"},
    503: {"model": models.ErrorOut, "description": "a service is unavailable"},
}


def api_router() -> APIRouter:
    """The router every route module uses: its JSON-body routes get the lean handler
    (gateway/lean.py), the rest FastAPI's."""
    return APIRouter(route_class=LeanRoute)
