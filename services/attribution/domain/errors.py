"""Domain errors of the attribution service.

Every bad input to a public function of ``services.attribution.domain`` raises
:class:`AttributionInputError`, a ``ValueError`` subclass that carries the name of the
offending argument or field in ``field`` so the servicer can put it in the gRPC error
details (INVALID_ARGUMENT) without parsing messages.
"""

from __future__ import annotations


class AttributionInputError(ValueError):
    """Invalid input to an attribution function; ``field`` names the argument/field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message
