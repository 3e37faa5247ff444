"""The principal (who is calling, in which of five roles) as it travels in gRPC metadata.

The gateway authenticates the HTTP caller and puts the principal in metadata; every
service reads it back here and refuses calls without a valid one, so the audit log
always knows who acted. (Signing the principal between services comes with the
access-control work; this module is the one place that will change.)
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from services.common.errors import Unauthenticated


class Role(str, Enum):
    ADMIN = "admin"
    ANALYST = "analyst"
    DATA_SCIENTIST = "data_scientist"
    PRIVACY_OFFICER = "privacy_officer"
    SERVICE = "service"


PRINCIPAL_KEY = "x-hearth-principal"
ROLE_KEY = "x-hearth-role"
_PRINCIPAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    role: Role

    def metadata(self) -> list[tuple[str, str]]:
        return [(PRINCIPAL_KEY, self.id), (ROLE_KEY, self.role.value)]


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def principal_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
    values = dict((k, v) for k, v in (metadata or ()) if isinstance(v, str))
    pid, role = values.get(PRINCIPAL_KEY), values.get(ROLE_KEY)
    if not pid or not role:
        raise Unauthenticated("no principal in request metadata", field=PRINCIPAL_KEY)
    if not _PRINCIPAL_ID.match(pid):
        raise Unauthenticated("malformed principal id", field=PRINCIPAL_KEY)
    try:
        return Principal(pid, Role(role))
    except ValueError:
        raise Unauthenticated("unknown role", field=ROLE_KEY) from None


def set_current(principal: Principal | None) -> contextvars.Token:
    return _current.set(principal)


def reset_current(token: contextvars.Token) -> None:
    _current.reset(token)


def current_principal() -> Principal:
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("no principal in request metadata", field=PRINCIPAL_KEY)
    return principal


# Services calling one another act as this principal (role "service").
def service_principal(service: str) -> Principal:
    return Principal(f"svc:{service}", Role.SERVICE)
