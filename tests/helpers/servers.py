"""Throwaway PostgreSQL clusters and redis-servers for the tests (the session fixtures
``postgres_dsn``/``redis_url``, and the raw-byte remnant tests, which need their own data
directory and settings).

Tied to the test process: the kernel kills the postmaster if pytest dies (its backends
then exit on postmaster death), as it kills redis-server, so a crashed run leaves no
server behind. A missing
binary FAILS (never skips): CI must not pass while a backend goes untested."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.child_process import spawn_tied, stop_group

# What the erasure path needs to remove WAL segments physically (docs/privacy.md §11),
# with full-page writes on as in production, so page images in the WAL are scanned too.
PURGEABLE_WAL = {"wal_recycle": "off", "full_page_writes": "on", "wal_keep_size": "0"}


@dataclass(frozen=True)
class Postgres:
    dsn: str
    data_dir: Path


@dataclass(frozen=True)
class Redis:
    url: str
    dir: Path | None   # where it writes its snapshot (dump.rdb), when persistence is on


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def _postgres_user() -> dict:
    # initdb and postgres refuse to run as root; CI runs as root (scripts/provision.sh
    # creates the user).
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


@contextlib.contextmanager
def running_postgres(**settings: str) -> Iterator[Postgres]:
    """initdb + postgres on a free port; ``settings`` are ``-c name=value`` over the fast
    test defaults (fsync off, no full-page writes)."""
    initdb, postgres = find_pg_bin("initdb"), find_pg_bin("postgres")
    if not initdb or not postgres:
        pytest.fail("PostgreSQL binaries (initdb, postgres) not found: install postgresql "
                    "(scripts/provision.sh does) — the PostgreSQL storage tests cannot be skipped")
    base = Path(tempfile.mkdtemp(prefix="hearth-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    as_user = _postgres_user()
    subprocess.run([initdb, "-D", str(data), "-A", "trust", "-U", "hearth", "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True, cwd=base, **as_user)
    port = _free_port()
    options = {"fsync": "off", "full_page_writes": "off", "max_connections": "200", **settings}
    args = [arg for name, value in options.items() for arg in ("-c", f"{name}={value}")]
    proc = spawn_tied([postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(base), *args],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=base, **as_user)
    dsn = f"postgresql://hearth@127.0.0.1:{port}/postgres"
    import psycopg

    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                psycopg.connect(dsn, connect_timeout=1).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("PostgreSQL did not start")
                time.sleep(0.1)
        yield Postgres(dsn, data)
    finally:
        stop_group(proc, sig=signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(base, ignore_errors=True)


def data_dir_files(pg: Postgres) -> dict[str, bytes]:
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
def running_redis(snapshot_dir: Path | None = None) -> Iterator[Redis]:
    """redis-server on a free port, no persistence; with ``snapshot_dir`` it writes
    ``dump.rdb`` there on ``SAVE``, uncompressed (so a raw scan of the file sees every
    string it holds)."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.fail("redis-server not found: install it (apt-get install redis-server; scripts/provision.sh does) "
                    "— the Redis tests cannot be skipped")
    port = _free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if snapshot_dir is not None:
        args += ["--dir", str(snapshot_dir), "--dbfilename", "dump.rdb", "--rdbcompression", "no"]
    proc = spawn_tied(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)
        yield Redis(f"redis://127.0.0.1:{port}/0", snapshot_dir)
    finally:
        client.close()
        stop_group(proc)
