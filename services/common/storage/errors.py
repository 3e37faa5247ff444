"""Driver-specific error sniffing, in one place: which exceptions of the SQLite and
PostgreSQL drivers mean what to a store."""

from __future__ import annotations

import sqlite3


def is_integrity_error(exc: BaseException) -> bool:
    """A constraint violation (unique key, ...) from either backend's driver."""
    if isinstance(exc, sqlite3.IntegrityError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, psycopg.errors.IntegrityError)
