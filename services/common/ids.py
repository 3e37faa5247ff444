"""The one id rule, the timestamp rule and the role/outcome vocabularies of the mesh.

Every entry point — gRPC servicers, the HTTP gateway, bulk tools, stores reading back
what they wrote — checks ids with ``check_id`` (or, in the gateway's pydantic models,
with ``ID_PATTERN``), so the same input is refused everywhere with the same words.

The rule: 1-128 characters of letters, digits, ``.``, ``_``, ``:`` or ``-``, starting
with a letter or digit, and nothing else: the WHOLE string must match. (A ``$`` anchor
with ``re.match`` accepts a trailing newline, which once let ``"acct\\n"`` through as a
distinct account; ``fullmatch`` does not.) Principal ids additionally allow ``@`` (they
are often e-mail-like subjects of tokens).
"""

from __future__ import annotations

import enum
import math
import re
import time

from services.common.errors import InvalidArgument

MAX_ID_CHARS = 128
ID_CHARS = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
PRINCIPAL_ID_CHARS = r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
# For pydantic/FastAPI ``pattern=``: pydantic-core's (Rust) regex anchors ``$`` at the
# very end of the text, so this form refuses a trailing newline there too.
ID_PATTERN = rf"^{ID_CHARS}$"
_ID = re.compile(ID_CHARS)
_PRINCIPAL_ID = re.compile(PRINCIPAL_ID_CHARS)
ID_RULE = ("must be 1-128 characters of letters, digits, '.', '_', ':' or '-', "
           "starting with a letter or digit")

MIN_TS = 946684800.0            # 2000-01-01: nothing older is a real event
MAX_FUTURE_SKEW_S = 24 * 3600.0  # clocks drift; a day ahead is already suspicious


def is_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: object, field: str) -> str:
    """``value`` if it is a valid id, else InvalidArgument naming ``field``."""
    if not is_id(value):
        raise InvalidArgument(ID_RULE, field)
    return value  # type: ignore[return-value]


def valid_principal_id(value: object) -> bool:
    return isinstance(value, str) and _PRINCIPAL_ID.fullmatch(value) is not None


def check_principal_id(value: object, field: str) -> str:
    if not valid_principal_id(value):
        raise InvalidArgument("must be 1-128 characters of letters, digits, '.', '_', ':', '@' or '-', "
                              "starting with a letter or digit", field)
    return value  # type: ignore[return-value]


def check_ts(value: object, field: str, now: float | None = None) -> float:
    """A finite UTC epoch-seconds timestamp between 2000-01-01 and a day from ``now``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidArgument("must be a finite UTC timestamp", field)
    now = time.time() if now is None else now
    if not MIN_TS <= value <= now + MAX_FUTURE_SKEW_S:
        raise InvalidArgument("must lie between 2000-01-01 and one day from now", field)
    return float(value)


class Role(enum.StrEnum):
    """The five principal roles that travel in gRPC metadata and audit records."""

    ADMIN = "admin"
    ANALYST = "analyst"
    DATA_SCIENTIST = "data_scientist"
    PRIVACY_OFFICER = "privacy_officer"
    SERVICE = "service"


class Outcome(enum.StrEnum):
    """How an audited action ended."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"
    ERROR = "error"
