"""Throwaway PostgreSQL clusters and redis-servers for the tests (the session fixtures
``postgres_dsn``/``redis_url``, and the raw-byte remnant tests, which need their own data
directory and settings).

The servers are services/testing/servers.py's (shared with the outage tests and
bench.verify): tied to the test process, so the kernel kills the postmaster if pytest dies
(its backends then exit on postmaster death), as it kills redis-server, and a crashed run
leaves no server behind. A missing binary FAILS (never skips): CI must not pass while a
backend goes untested."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.testing.servers import MissingServer, PostgresServer, RedisServer

# What the erasure path needs to remove WAL segments physically (docs/privacy.md §11),
# with full-page writes on as in production, so page images in the WAL are scanned too.
PURGEABLE_WAL = {"wal_recycle": "off", "full_page_writes": "on", "wal_keep_size": "0"}


@contextlib.contextmanager
def running_postgres(**settings: str) -> Iterator[PostgresServer]:
    """initdb + postgres on a free port (``.dsn``, ``.data_dir``); ``settings`` are
    ``-c name=value`` over the fast test defaults (fsync off, no full-page writes)."""
    try:
        server = PostgresServer(durable=False, settings=settings)
    except MissingServer as exc:
        pytest.fail(f"{exc} — the PostgreSQL storage tests cannot be skipped")
    try:
        yield server.init().start()
    finally:
        server.remove()   # PostgreSQL's fast shutdown, then the directory


def data_dir_files(pg: PostgresServer) -> dict[str, bytes]:
    """Every regular file of the data directory (heap, indexes, TOAST, catalogs incl.
    ``pg_statistic``, ``pg_wal``), by path relative to it."""
    out = {}
    for path in sorted(pg.data_dir.rglob("*")):
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):   # a segment removed while we walk
                out[str(path.relative_to(pg.data_dir))] = path.read_bytes()
    return out


def relation_names(dsn: str) -> dict[str, str]:
    """``base/<db oid>/<filenode>`` -> ``schema.relation`` for the database of ``dsn``
    (forks and segments, ``_fsm``, ``.1``, map to the same name), so a raw hit can be
    attributed to the service that owns the table. TOAST tables and indexes are named by
    the table they belong to."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT 'base/' || d.oid || '/' || pg_relation_filenode(c.oid), n.nspname || '.' || "
            "COALESCE(owner.relname, t.relname, c.relname) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_database d ON d.datname = current_database() "
            "LEFT JOIN pg_index i ON i.indexrelid = c.oid LEFT JOIN pg_class t ON t.oid = i.indrelid "
            "LEFT JOIN pg_class owner ON owner.reltoastrelid = COALESCE(t.oid, c.oid) "
            "WHERE pg_relation_filenode(c.oid) IS NOT NULL").fetchall()
    return dict(rows)


@contextlib.contextmanager
def running_redis(snapshot_dir: Path | None = None, **settings: str | tuple[str, ...]) -> Iterator[RedisServer]:
    """redis-server on a free port (``.url``), no persistence; with ``snapshot_dir`` it
    writes an uncompressed ``dump.rdb`` there on ``SAVE`` (``.dir``); ``settings`` are
    ``--name value`` over those defaults (``appendonly="yes"``: an AOF there too)."""
    try:
        server = RedisServer(snapshot_dir, settings)
    except MissingServer as exc:
        pytest.fail(f"{exc} — the Redis tests cannot be skipped")
    try:
        yield server.start()
    finally:
        server.stop()
