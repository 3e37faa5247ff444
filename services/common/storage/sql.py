"""SQL backends behind one small interface: SQLite (embedded default) and PostgreSQL
(psycopg 3 with a pool).

Queries are written once with ``?`` placeholders and a portable subset of SQL
(``INSERT .. ON CONFLICT DO NOTHING``, ``RETURNING``); the PostgreSQL backend rewrites
placeholders to ``%s``. Migrations use ``{blob}``, ``{double}``, ``{bigint}`` and
``{serial_pk}`` for the few types that differ.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.common.errors import Unavailable

_TYPES = {
    "sqlite": {"blob": "BLOB", "double": "REAL", "bigint": "INTEGER",
               "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgres": {"blob": "BYTEA", "double": "DOUBLE PRECISION", "bigint": "BIGINT",
                 "serial_pk": "BIGSERIAL PRIMARY KEY"},
}


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str  # one or more statements separated by ';' on their own line ends


class Tx(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...


class Database(Protocol):
    dialect: str

    def transaction(self, readonly: bool = False) -> contextlib.AbstractContextManager[Tx]: ...
    def purge_erased(self, tables: Sequence[str] = (), rewrite: bool = False) -> dict[str, Any]: ...
    def close(self) -> None: ...


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        return self._conn.executemany(sql, rows).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn.execute(sql, tuple(params)).fetchall()


class SqliteDatabase:
    """One connection per thread (sqlite3 objects are not shareable), WAL journal so
    readers never block the writer, ``synchronous=FULL`` so an acknowledged commit
    survives a power cut, ``BEGIN IMMEDIATE`` so write transactions serialise up front
    instead of failing on upgrade. Read-only transactions (``readonly=True``) start
    ``BEGIN DEFERRED``: they read a WAL snapshot and never take the write lock, so a
    read does not queue behind a writer's fsync (the hot path's reads: session, model,
    labels). A write inside a read-only transaction is a bug: it could fail with
    SQLITE_BUSY on upgrade instead of waiting.

    Closing is safe while other threads still use the database (a background refit, a
    deletion worker, an RPC in flight): closing a sqlite3 connection while another thread
    executes on it crashes the interpreter. So every transaction is counted; ``close()``
    refuses new ones at once (``Unavailable``: the process is shutting down), waits for
    the ones in flight, and closes only idle connections. A transaction still running when
    the wait times out keeps its connection, and its own thread closes it when it ends."""

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(threading.Lock())  # guards the two below
        self._busy: set[sqlite3.Connection] = set()
        self._closed = False

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            # Deleted rows are overwritten with zeros in the page (and so in the WAL frame
            # that carries it), not just unlinked: erased means unreadable (docs/privacy.md).
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[sqlite3.Connection]:
        with self._idle:
            if self._closed:
                raise Unavailable("database is closed (the service is shutting down)")
        conn = self._conn()
        with self._idle:
            if self._closed:  # closed between the check and the connection
                raise Unavailable("database is closed (the service is shutting down)")
            self._busy.add(conn)
        try:
            yield conn
        finally:
            with self._idle:
                self._busy.discard(conn)
                closed = self._closed
                self._idle.notify_all()
            if closed:  # close() left this connection to us
                with self._lock:
                    if conn in self._all:
                        self._all.remove(conn)
                conn.close()
                self._local.conn = None

    @contextlib.contextmanager
    def transaction(self, readonly: bool = False) -> Iterator[Tx]:
        with self._in_use() as conn:
            conn.execute("BEGIN DEFERRED" if readonly else "BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def purge_erased(self, tables: Sequence[str] = (), rewrite: bool = False) -> dict[str, Any]:
        """Make an erasure physical (call after the erasing transaction committed).

        ``secure_delete`` already zeroed the deleted cells in the pages written to the
        WAL; the older WAL frames still hold the pages as they were before. A TRUNCATE
        checkpoint copies every frame into the main file and truncates the ``-wal`` file
        to zero bytes, so no earlier page image survives anywhere. It waits (busy
        handler) for readers on an older snapshot; a checkpoint that stays busy is
        retried, then reported (``complete`` False) rather than hidden."""
        started = time.time()
        complete = False
        with self._in_use() as conn:
            for _ in range(20):
                busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    complete = True
                    break
                time.sleep(0.05)
        return {"store": "sqlite", "where": Path(self.path).name,
                "action": "secure_delete; wal_checkpoint(TRUNCATE)", "at": started, "complete": complete}

    def close(self, timeout_s: float = 30.0) -> None:
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: not self._busy, timeout_s)
            busy = set(self._busy)
        with self._lock:
            idle = [conn for conn in self._all if conn not in busy]
            self._all = [conn for conn in self._all if conn in busy]
        for conn in idle:
            conn.close()


_PLACEHOLDER = re.compile(r"\?")


class _PostgresTx:
    def __init__(self, cur) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(_PLACEHOLDER.sub("%s", sql), tuple(params))
        return self._cur.rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        self._cur.executemany(_PLACEHOLDER.sub("%s", sql), rows)
        return self._cur.rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        self._cur.execute(_PLACEHOLDER.sub("%s", sql), tuple(params))
        return self._cur.fetchall()


class PostgresDatabase:
    """psycopg 3 with a connection pool; each service lives in its own schema so no
    service can read another's tables by accident."""

    dialect = "postgres"

    def __init__(self, dsn: str, schema: str, max_size: int = 8) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.schema = schema
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        # Riding out a restart of PostgreSQL (docs/operations.md, "Outages"): a pooled
        # connection is checked before use (a broken one is replaced, not handed out);
        # waiting for a connection is bounded well under the callers' deadlines, so a
        # request during the outage fails fast with Unavailable (UNAVAILABLE / 503 +
        # Retry-After) instead of timing out; the pool reconnects in the background.
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=max_size, open=True, timeout=3.0,
            check=ConnectionPool.check_connection,
            kwargs={"options": f"-c search_path={schema}", "autocommit": False, "connect_timeout": 2},
        )

    @contextlib.contextmanager
    def transaction(self, readonly: bool = False) -> Iterator[Tx]:
        """``readonly`` changes nothing here (MVCC readers never wait for writers); it
        is accepted so that stores state intent once for both backends."""
        import psycopg
        from psycopg_pool import PoolClosed

        try:
            with self._pool.connection() as conn:
                with conn.transaction(), conn.cursor() as cur:
                    yield _PostgresTx(cur)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        except PoolClosed as exc:  # closed while the service shuts down; in-flight use finishes
            raise Unavailable("database is closed (the service is shutting down)") from exc

    def purge_erased(self, tables: Sequence[str] = (), rewrite: bool = False) -> dict[str, Any]:
        """After an erasure: VACUUM (ANALYZE) the tables it deleted from, so dead tuples
        leave the heap and its indexes and the planner statistics (``pg_statistic``
        most-common values) are recomputed without the erased rows. ``rewrite`` (small
        tables only, it locks them): VACUUM FULL, a fresh copy without any freed bytes. What this does not
        reach (bytes left in page free space until reused, WAL segments until recycled,
        archives, replicas' WAL) is covered by encryption under the household key the
        deletion destroys; docs/privacy.md says what "erased" means on PostgreSQL."""
        import psycopg

        started = time.time()
        try:
            with self._pool.connection() as conn:
                conn.autocommit = True
                try:
                    for table in tables:
                        conn.execute(f'VACUUM ({"FULL, " if rewrite else ""}ANALYZE) "{self.schema}"."{table}"')
                finally:
                    conn.autocommit = False
        except psycopg.OperationalError as exc:
            raise Unavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        return {"store": "postgres", "where": f"{self.schema}: {', '.join(tables)}",
                "action": "VACUUM (FULL, ANALYZE)" if rewrite else "VACUUM (ANALYZE)", "at": started,
                "complete": True}

    def close(self) -> None:
        self._pool.close()


def open_database(settings, service: str) -> Database:
    """The service's database; also registered as the critical dependency of its health
    report (services/common/health_report.py)."""
    from services.common import health_report

    if settings.storage == "postgres":
        db: Database = PostgresDatabase(settings.postgres_dsn, f"hearth_{service}", settings.postgres_pool_max)
    else:
        db = SqliteDatabase(Path(settings.data_dir) / f"{service}.db")
    health_report.register("database", lambda: probe(db), critical=True)
    return db


def probe(db: Database) -> str:
    """"" when the database answers a trivial query, else why not."""
    try:
        with db.transaction() as tx:
            tx.query("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return f"{type(exc).__name__}: {exc}"[:200]
    return ""


def migrate(db: Database, migrations: Sequence[Migration]) -> list[int]:
    """Apply the migrations not yet applied, each in its own transaction, in version
    order. Safe with several replicas starting at once: PostgreSQL takes an advisory
    lock, SQLite's BEGIN IMMEDIATE serialises writers. Returns the versions applied."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError("migration versions must be unique and increasing")
    types = _TYPES[db.dialect]
    applied: list[int] = []
    with db.transaction() as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                   "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
    for migration in migrations:
        with db.transaction() as tx:
            if db.dialect == "postgres":
                tx.execute("SELECT pg_advisory_xact_lock(7262781)")
            if tx.query("SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)):
                continue
            for statement in migration.sql.format(**types).split(";\n"):
                if statement.strip():
                    tx.execute(statement)
            tx.execute("INSERT INTO schema_migrations (version, name, applied_at) "
                       "VALUES (?, ?, CURRENT_TIMESTAMP)", (migration.version, migration.name))
            applied.append(migration.version)
    return applied


def schema_version(db: Database) -> int:
    with db.transaction() as tx:
        rows = tx.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(rows[0][0])
