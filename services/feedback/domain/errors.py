"""The one exception the feedback domain raises for bad input.

``InvalidArgument`` subclasses ``ValueError`` so plain callers can catch the usual type,
and carries ``field`` so the servicer can name the offending field in the gRPC error
details (INVALID_ARGUMENT) without parsing the message.
"""

from __future__ import annotations


class InvalidArgument(ValueError):
    """Bad input to a public feedback-domain function; ``field`` names the argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message
