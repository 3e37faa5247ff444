"""Domain errors of the attribution service.

Every bad input to a public function of ``services.attribution.domain`` raises
:class:`AttributionInputError`. It is a :class:`services.common.errors.InvalidArgument`
(hence a ``ValueError``), so the one error table maps it to INVALID_ARGUMENT with the
offending argument/field in ``field``.
"""

from __future__ import annotations

from services.common.errors import InvalidArgument


class AttributionInputError(InvalidArgument):
    """Invalid input to an attribution function; ``field`` names the argument/field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field)
        self.reason = message
