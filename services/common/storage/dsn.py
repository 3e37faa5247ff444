"""A PostgreSQL DSN read once, for everything that takes one apart (the services'
configuration, `hearth db provision-roles`, `hearth backup`/`restore`).

libpq's parser names the token it could not read, in quotes: a password holding a ``%``
that is not a percent escape came out whole (``invalid percent-encoded token:
"<password>"``), one holding a space (keyword form) from the space on — in a service's
start-up traceback, the provisioning Job's log and `hearth backup`'s error (attack29).
The error here names the variable and the fault, with every quoted piece removed."""

from __future__ import annotations

import re

_QUOTED = re.compile(r'"[^"]*"')


def parse_dsn(dsn: str, variable: str) -> dict[str, str]:
    """``dsn``'s parts (libpq's, as ``psycopg.conninfo.conninfo_to_dict``); ValueError
    naming ``variable`` and the fault, never a piece of the DSN, when it does not parse."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception as exc:   # noqa: BLE001 - psycopg's ProgrammingError (and anything like it)
        fault = _QUOTED.sub('"…"', str(exc).strip()) or type(exc).__name__
        raise ValueError(f"{variable}: not a PostgreSQL DSN ({fault}; the DSN itself is not shown: "
                         "it holds a password)") from None
