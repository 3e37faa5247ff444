"""The one exception the feedback domain raises for bad input.

``InvalidArgument`` is the mesh's ``services.common.errors.InvalidArgument`` (so the
error interceptor maps it to INVALID_ARGUMENT with the field in trailing metadata, and
it is still a ``ValueError``), with the argument order the domain code reads best in:
field first, then what is wrong with it.
"""

from __future__ import annotations

from services.common import errors as common_errors


class InvalidArgument(common_errors.InvalidArgument):
    """Bad input to a public feedback-domain function; ``field`` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field)
