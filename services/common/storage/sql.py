"""SQL backends behind one small interface: SQLite (embedded default) and PostgreSQL
(psycopg 3 with a pool).

Queries are written once with ``?`` placeholders and a portable subset of SQL
(``INSERT .. ON CONFLICT DO NOTHING``, ``RETURNING``); the PostgreSQL backend rewrites
placeholders to ``%s``. Migrations use ``{blob}``, ``{double}``, ``{bigint}`` and
``{serial_pk}`` for the few types that differ.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.common.errors import Unavailable

log = logging.getLogger("hearth.storage")

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
    def lock_household(self, account_id: str) -> None:
        """Hold the household until the transaction ends: a household's writes and its
        erasure run one after the other, so no write can commit rows the erasure did not
        see (docs/privacy.md, "An erased household stays erased")."""

    def lock_households(self, account_ids: Sequence[str]) -> None:
        """``lock_household`` of each of ``account_ids``, in the order given (callers sort
        them: transactions that share households then take them in the same order)."""


class Database(Protocol):
    dialect: str

    def transaction(self, readonly: bool = False, snapshot: bool = False) -> contextlib.AbstractContextManager[Tx]:
        """``readonly``: reads only. ``snapshot`` (implies ``readonly``): every statement of the
        transaction sees the same snapshot of the database, what committed before its first
        statement — SQLite's read transaction does (WAL); PostgreSQL's only at REPEATABLE READ
        (under the default READ COMMITTED each statement sees what committed before it)."""
    def purge_erased(self, tables: Sequence[str] = ()) -> dict[str, Any]: ...
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

    def lock_household(self, account_id: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already serialises every write transaction."""

    def lock_households(self, account_ids: Sequence[str]) -> None:
        """Nothing to do (``lock_household``)."""


# How long a refused write keeps the "database writes" check failing (WriteHealth).
WRITE_REFUSAL_WINDOW_S = 30.0


class WriteHealth:
    """Whether the database takes writes: the ``database writes`` health check
    (docs/operations.md, "Health"), registered beside ``database`` by ``open_database``.

    The ``database`` check's ``SELECT 1`` answers on a full disk, and so do reads: in
    session 20's and 23's drills every service said SERVING while every write answered
    503. This check is fed by the transactions themselves (no probe writes anything):
    a write the database refused for want of room or write access — SQLite full,
    read-only or I/O error; PostgreSQL ``DiskFull`` or read-only — makes it fail for
    ``WRITE_REFUSAL_WINDOW_S`` after the last such refusal, naming the error and its
    age. Not critical: the service stays SERVING (reads still work, and every replica
    shares the disk or the database, so NOT_SERVING would take
    them all out of the Service and turn a write outage into a full one); the failing
    check degrades it and ``hearth_dependency_up{dependency="database writes"}`` is 0
    (alert HearthDatabaseWritesRefused). Nothing is recorded on the hot path of a
    write that succeeds."""

    def __init__(self, window_s: float = WRITE_REFUSAL_WINDOW_S, clock=time.monotonic) -> None:
        self._window = window_s
        self._clock = clock
        self._refused_at: float | None = None
        self._reason = ""
        self.refusals = 0

    def refused(self, reason: str) -> None:
        self._reason = reason[:160]
        self._refused_at = self._clock()
        self.refusals += 1

    def probe(self) -> str:
        at = self._refused_at
        if at is None:
            return ""
        age = self._clock() - at
        return f"writes refused: {self._reason} ({age:.0f} s ago)" if age < self._window else ""


# SQLite's result codes (the primary code, the low byte) that say the database cannot
# take the statement now, not that the statement is wrong: a full disk, a file or
# directory made read-only, an I/O error, a lock held past the busy timeout.
SQLITE_UNAVAILABLE_CODES = {getattr(sqlite3, name) for name in (
    "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN")}
# Of those, the ones that say the storage itself refuses writes (not contention).
_SQLITE_WRITES_REFUSED = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR}


@contextlib.contextmanager
def _sqlite_unavailable(writes: WriteHealth | None = None) -> Iterator[None]:
    """The database cannot write now → ``Unavailable`` (gRPC UNAVAILABLE, HTTP 503 with
    Retry-After: retry later), not an unexpected error (INTERNAL, 502 "upstream error",
    and a traceback logged per request, as until session 20 with the data directory's
    disk full)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in SQLITE_UNAVAILABLE_CODES:
            if writes is not None and code in _SQLITE_WRITES_REFUSED:
                writes.refused(str(exc))
            raise Unavailable(f"database unavailable: {exc}") from exc
        raise


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
        # The thread each connection belongs to: one whose thread has ended is closed when
        # the next thread opens its own (attack26: every health check runs on a new thread,
        # so each service kept one more connection, two file descriptors, every 2 s).
        self._owner: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(threading.Lock())  # guards the two below
        self._busy: set[sqlite3.Connection] = set()
        self._closed = False
        self.writes = WriteHealth()

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
                self._owner[id(conn)] = threading.current_thread()
            self._close_connections_of_ended_threads()
        return conn

    def _close_connections_of_ended_threads(self) -> None:
        with self._idle, self._lock:
            ended = [conn for conn in self._all
                     if conn not in self._busy and not self._owner[id(conn)].is_alive()]
            for conn in ended:
                self._all.remove(conn)
                del self._owner[id(conn)]
        for conn in ended:   # no thread can reach it any more: its own has ended
            conn.close()

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
                        self._owner.pop(id(conn), None)
                conn.close()
                self._local.conn = None

    @contextlib.contextmanager
    def transaction(self, readonly: bool = False, snapshot: bool = False) -> Iterator[Tx]:
        """``snapshot``: a read transaction is one already (WAL: its statements read the
        snapshot its first one began)."""
        with self._in_use() as conn, _sqlite_unavailable(self.writes):
            conn.execute("BEGIN DEFERRED" if readonly or snapshot else "BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(conn)
            except BaseException:
                if conn.in_transaction:   # SQLite may have rolled back itself (SQLITE_FULL, IOERR)
                    conn.execute("ROLLBACK")
                raise
            else:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error:
                    if conn.in_transaction:   # never leave this thread's connection inside it
                        conn.execute("ROLLBACK")
                    raise

    def purge_erased(self, tables: Sequence[str] = ()) -> dict[str, Any]:
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
            self._owner = {id(conn): self._owner[id(conn)] for conn in self._all}
        for conn in idle:
            conn.close()


_PLACEHOLDER = re.compile(r"\?")


class _PostgresTx:
    def __init__(self, cur, schema: str) -> None:
        self._cur = cur
        self._schema = schema

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

    def lock_household(self, account_id: str) -> None:
        """A transaction-scoped advisory lock on the household (read committed lets a
        DELETE miss rows another transaction has inserted but not yet committed), in this
        service's schema only: advisory locks are per database, and the services share
        one. Until session 24 the key was the household's alone, so a clustering replica
        frozen inside a transaction (SIGSTOP, a hung node, a GC pause) blocked
        attribution's writes and erasures of the same household until it went on — a
        deletion job waited on attribution for as long as clustering was frozen.

        The household-only key is still taken, *shared*, for a rolling upgrade: a replica
        older than session 24 takes it exclusively, so its writes and a newer replica's
        erasure of the same household (and the reverse) still serialise while both run;
        shared holders never wait for each other, so once every replica is this version
        nothing is held up across services. (Drop it a release after session 24.)"""
        self._cur.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))",
                          ("household:" + account_id,))
        self._cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                          (f"{self._schema}:household:{account_id}",))

    def lock_households(self, account_ids: Sequence[str]) -> None:
        """``lock_household`` of every one of ``account_ids`` in two statements, each taking
        its locks in the order given (unnest's): one a household kept 10,000 round trips
        inside the write transaction of a batch of 5,000 households (ingest31). The shared
        household-only keys first, then this schema's exclusive ones: shared keys wait only
        for a replica older than session 24 holding one exclusively, and the exclusive keys
        are still taken in the callers' sorted order, so two batches cannot deadlock."""
        if not account_ids:
            return
        accounts = list(account_ids)
        self._cur.execute("SELECT count(pg_advisory_xact_lock_shared(hashtextextended('household:' || a, 0))) "
                          "FROM unnest(%s::text[]) AS a", (accounts,))
        self._cur.execute("SELECT count(pg_advisory_xact_lock(hashtextextended(%s || a, 0))) "
                          "FROM unnest(%s::text[]) AS a", (f"{self._schema}:household:", accounts))


def _own_schema(conn, schema: str) -> None:
    """Create ``schema`` if it is missing, and check that this login may create tables in
    it (its migrations). Looked up first: with a login per service (``hearth db
    provision-roles``, session 28) the schema exists, owned by the service's role, which
    has no CREATE on the database — and ``CREATE SCHEMA IF NOT EXISTS`` checks that
    privilege before it looks. A login that may not use the schema stops the service at
    start with what to run, not with a migration's "permission denied"."""
    import psycopg

    from services.common.config import ConfigError

    user = conn.execute("SELECT current_user").fetchone()[0]
    if not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
        try:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        except psycopg.errors.InsufficientPrivilege:
            raise ConfigError(f"invalid configuration:\n  HEARTH_POSTGRES_DSN: schema {schema} does not exist and "
                              f"role {user} may not create it: run `hearth db provision-roles` "
                              "(docs/operations.md, \"Database roles\")") from None
    if not conn.execute("SELECT has_schema_privilege(%s, 'CREATE')", (schema,)).fetchone()[0]:
        owner = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s",
                             (schema,)).fetchone()[0]
        raise ConfigError(f"invalid configuration:\n  HEARTH_POSTGRES_DSN: role {user} has no rights on schema "
                          f"{schema} (owned by {owner}): run `hearth db provision-roles` "
                          "(docs/operations.md, \"Database roles\")")


# What the server answers a login it does not know: under trust or peer authentication
# that the role does not exist; under a password method (production's SCRAM) only that
# the password failed, whether the role exists or not.
_UNKNOWN_LOGIN = re.compile(r'role "([^"]+)" does not exist|password authentication failed for user "([^"]+)"')


def _connect_at_start(dsn: str):
    """The start-up connection. A login the server refuses as unknown (or its password
    not the one provisioning set) stops the service with what to run, as ``_own_schema``
    does for one that may not use its schema: until session 30 a psycopg traceback (its
    drill: privacy's database on another server than the admin DSN's, not provisioned
    there, stopped privacy so)."""
    import psycopg

    from services.common.config import ConfigError

    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        refused = _UNKNOWN_LOGIN.search(str(exc))
        if not refused:
            raise
        role, password_failed = refused.group(1) or refused.group(2), refused.group(2) is not None
        what = (f"the server it names refused role {role}'s password: the role does not exist there, or its "
                "password is not this DSN's" if password_failed else
                f"role {role} does not exist on the server it names")
        raise ConfigError(f"invalid configuration:\n  HEARTH_POSTGRES_DSN: {what}: run `hearth db provision-roles` "
                          "with this DSN and that server's admin DSN (a service whose database is on another "
                          "server than the others': `--service <name>`, docs/operations.md, \"Database roles\")"
                          ) from None


# How long a transaction waits for a pooled connection (less within an RPC whose deadline is nearer).
POOL_WAIT_S = 3.0


class PostgresDatabase:
    """psycopg 3 with a connection pool; each service lives in its own schema so no
    service can read another's tables by accident."""

    dialect = "postgres"

    def __init__(self, dsn: str, schema: str, max_size: int = 8) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.schema = schema
        self.writes = WriteHealth()
        with _connect_at_start(dsn) as conn:
            _own_schema(conn, schema)
        # Riding out a restart of PostgreSQL (docs/operations.md, "Outages"): a pooled
        # connection is checked before use (a broken one is replaced, not handed out);
        # waiting for a connection is bounded well under the callers' deadlines, so a
        # request during the outage fails fast with Unavailable (UNAVAILABLE / 503 +
        # Retry-After) instead of timing out; the pool reconnects in the background.
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=max_size, open=True, timeout=POOL_WAIT_S,
            check=ConnectionPool.check_connection,
            kwargs={"options": f"-c search_path={schema}", "autocommit": False, "connect_timeout": 2},
        )

    @contextlib.contextmanager
    def transaction(self, readonly: bool = False, snapshot: bool = False) -> Iterator[Tx]:
        """``readonly`` changes nothing here (MVCC readers never wait for writers); it
        is accepted so that stores state intent once for both backends. ``snapshot``: the
        transaction is REPEATABLE READ, READ ONLY — its statements see one snapshot, taken
        at its first (READ COMMITTED, the default, takes one per statement). Said in its
        BEGIN (the connection's attributes, reset after): no statement more. A read-only
        transaction never fails to serialise at this level."""
        import psycopg
        from psycopg import IsolationLevel
        from psycopg_pool import PoolClosed

        from services.common.client import serving_time_left

        # Within an RPC, no statement outlives the caller's deadline (session 18): one
        # table locked by another session (a migration, a purge's VACUUM FULL, an
        # operator's transaction) otherwise kept every request touching it waiting for
        # the lock long after its caller had given up, each holding a pooled connection,
        # until the pool ran dry and the service answered NOT_SERVING / 503 on every
        # route ("database unavailable: PoolTimeout") while PostgreSQL itself was fine;
        # when the lock went, the abandoned writes still committed.
        left = serving_time_left()
        try:
            with self._pool.connection(timeout=min(POOL_WAIT_S, left) if left is not None else None) as conn:
                if snapshot:
                    conn.isolation_level, conn.read_only = IsolationLevel.REPEATABLE_READ, True
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        if left is not None:
                            cur.execute(f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}")
                        yield _PostgresTx(cur, self.schema)
                finally:
                    if snapshot:
                        try:
                            conn.isolation_level, conn.read_only = None, None
                        except psycopg.Error:
                            conn.close()   # the pool replaces it: never a read-only connection handed on
        except psycopg.OperationalError as exc:
            if isinstance(exc, psycopg.errors.DiskFull):
                self.writes.refused(f"DiskFull: {exc}")
            raise Unavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            self.writes.refused("the database is read-only")
            # A standby (a failover the DSN has not followed yet) or a database set
            # read-only (default_transaction_read_only, e.g. while its disk is nearly
            # full): reads work, writes wait. Until session 20 every write was INTERNAL —
            # 502 "upstream error" and a traceback per request — with nothing to retry on.
            raise Unavailable("database is read-only (a standby, or default_transaction_read_only): "
                              "writes are refused until it accepts them again") from exc
        except PoolClosed as exc:  # closed while the service shuts down; in-flight use finishes
            raise Unavailable("database is closed (the service is shutting down)") from exc

    def purge_erased(self, tables: Sequence[str] = ()) -> dict[str, Any]:
        """Physical purge after an erasure (call after the erasing transaction committed);
        docs/privacy.md §11 says why this and not encryption, and what it costs.

        1. ``VACUUM (FULL, ANALYZE)`` of each table: heap, TOAST and every index are
           written afresh (new pages start zeroed), and the old files are truncated to
           zero bytes at commit. A plain VACUUM would leave the deleted tuples' bytes in
           page free space. The personal tables collect no column statistics
           (``migrate(personal_tables=...)``), so ``pg_statistic`` never held their values.
        2. The WAL, which still holds the deleted rows as inserted (and page images):
           ``pg_switch_wal()`` closes the current segment and ``CHECKPOINT`` moves the
           redo point past it, so every older segment is removed — *removed* only with
           ``wal_recycle = off`` (otherwise it is renamed for reuse and keeps its bytes
           until overwritten), ``wal_keep_size = 0``, no replication slot and no
           archiving (those keep segments on purpose). What prevents it is named in
           ``action`` and ``complete`` is False: the receipt says so, nothing is hidden.
        CHECKPOINT and ``pg_switch_wal`` need a superuser or ``pg_checkpoint`` plus
        ``GRANT EXECUTE ON FUNCTION pg_switch_wal()`` (docs/operations.md)."""
        import psycopg

        started = time.time()
        steps, blockers = [], []
        try:
            with self._pool.connection() as conn:
                conn.autocommit = True
                try:
                    pending = [r[0] for r in conn.execute(f"SELECT id FROM {PENDING_TABLE}").fetchall()]
                    if not pending:   # a retried Erase that found nothing: an earlier call purged
                        return {"store": "postgres", "where": f"{self.schema}: {', '.join(tables)}; pg_wal",
                                "action": "nothing left to purge: every erasure here was purged before",
                                "at": started, "complete": True}
                    if not _wait_for_older_transactions(conn):
                        blockers.append("a transaction older than the erasure was still running "
                                        f"after {OLD_TRANSACTION_WAIT_S:.0f} s: VACUUM FULL kept rows it may still see")
                    # VACUUM FULL needs the table alone (ACCESS EXCLUSIVE): bounded, so a
                    # long reader fails the purge (reported, the job retries) instead of
                    # queueing every later query of the table behind it.
                    conn.execute(f"SET lock_timeout = {int(OLD_TRANSACTION_WAIT_S * 1000)}")
                    try:
                        for table in tables:
                            conn.execute(f'VACUUM (FULL, ANALYZE) "{self.schema}"."{table}"')
                        if tables:
                            steps.append(f"VACUUM (FULL, ANALYZE) {', '.join(tables)}")
                    except psycopg.errors.LockNotAvailable:
                        blockers.append(f"{table} stayed locked by another transaction for "
                                        f"{OLD_TRANSACTION_WAIT_S:.0f} s: not rewritten")
                    finally:
                        conn.execute("RESET lock_timeout")
                    blockers += _wal_retention(conn)
                    try:
                        conn.execute("SELECT pg_switch_wal()")
                        conn.execute("CHECKPOINT")
                        steps.append("pg_switch_wal(); CHECKPOINT")
                    except psycopg.errors.InsufficientPrivilege as exc:
                        blockers.append(f"no privilege to remove WAL segments ({exc.diag.message_primary})")
                    if not blockers:   # else the next Erase (the job's retry) purges again
                        conn.execute(f"DELETE FROM {PENDING_TABLE} WHERE id = ANY(%s)", (pending,))
                finally:
                    conn.autocommit = False
        except psycopg.OperationalError as exc:
            raise Unavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        if blockers:
            steps.append("not purged: " + "; ".join(blockers))
            log.warning("erasure purge of %s incomplete: %s", self.schema, "; ".join(blockers))
        return {"store": "postgres", "where": f"{self.schema}: {', '.join(tables)}; pg_wal",
                "action": "; ".join(steps), "at": started, "complete": not blockers}

    def keep_out_of_statistics(self, tables: Sequence[str]) -> None:
        """No column of these tables is sampled into ``pg_statistic`` (statistics target
        0): ANALYZE would copy personal values (most-common values, histogram bounds)
        into a catalog that an erasure cannot rewrite. The planner keeps row counts and
        the indexes; every query of these tables is by an indexed key. Idempotent; run
        after the migrations, so columns added later are covered. Statistics sampled
        before this rule existed stay until a superuser deletes them (docs/privacy.md §11)."""
        with self.transaction() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(7262781)")   # replicas starting together: one at a time
            columns = tx.query(
                "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ? AND c.relname = ANY(?) "
                "AND a.attnum > 0 AND NOT a.attisdropped AND COALESCE(a.attstattarget, -1) <> 0 "
                "ORDER BY c.relname, a.attnum", (self.schema, list(tables)))
            for table, column in columns:
                tx.execute(f'ALTER TABLE "{self.schema}"."{table}" ALTER COLUMN "{column}" SET STATISTICS 0')

    def close(self) -> None:
        self._pool.close()


OLD_TRANSACTION_WAIT_S = 10.0   # well inside the deletion worker's Erase deadline (60 s)


def _wait_for_older_transactions(conn) -> bool:
    """Wait until no transaction or snapshot older than now remains (any backend). VACUUM
    FULL copies a deleted row into the new table while some snapshot may still see it
    ("recently dead"), so the rewrite must come after every transaction that was running
    when the erasure committed. False when one outlives ``OLD_TRANSACTION_WAIT_S``."""
    now = conn.execute("SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text").fetchone()[0]
    deadline = time.monotonic() + OLD_TRANSACTION_WAIT_S
    while True:
        older = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND greatest(age(backend_xid), age(backend_xmin)) > age(%s::xid)", (now,)).fetchone()[0]
        if not older:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _wal_retention(conn) -> list[str]:
    """The settings that keep WAL segments (and so the erased rows in them) past a
    checkpoint; empty when a checkpoint removes every segment before its redo point."""
    settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN "
                                 "('wal_recycle', 'wal_keep_size', 'archive_mode')").fetchall())
    slots = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0]
    reasons = []
    if settings.get("wal_recycle") != "off":
        reasons.append("wal_recycle=on renames old segments for reuse (their bytes stay until overwritten)")
    if settings.get("wal_keep_size", "0") != "0":
        reasons.append(f"wal_keep_size={settings['wal_keep_size']}MB")
    if settings.get("archive_mode", "off") != "off":
        reasons.append("archive_mode keeps segments until archived (and the archive keeps them)")
    if slots:
        reasons.append(f"{slots} replication slot(s)")
    return reasons


def open_database(settings, service: str) -> Database:
    """The service's database; also registered as the critical dependency of its health
    report (services/common/health_report.py)."""
    from services.common import health_report

    if settings.storage == "postgres":
        db: Database = PostgresDatabase(settings.postgres_dsn, f"hearth_{service}", settings.postgres_pool_max)
    else:
        db = SqliteDatabase(Path(settings.data_dir) / f"{service}.db")
    health_report.register("database", lambda: probe(db), critical=True)
    health_report.register("database writes", db.writes.probe)
    return db


# Rows a streamed export reads per page (``keyset_rows``): each page is one short read
# transaction, so an export paced by a slow client never holds one open (a SQLite reader
# held open blocks the WAL checkpoint an erasure's purge runs; a PostgreSQL one holds back
# vacuum).
EXPORT_PAGE_ROWS = 1000


def keyset_rows(db: Database, select: str, params: Sequence[Any], order: tuple[str, str],
                positions: tuple[int, int], page_rows: int = EXPORT_PAGE_ROWS) -> Iterator[tuple]:
    """The rows of ``select`` (``SELECT ... FROM ... WHERE ...``, no ORDER BY) ordered by the
    two columns ``order`` (unique together, found at ``positions`` in each row), read
    lazily in pages of ``page_rows`` by keyset (``(a, b) > last``), never all at once. Not a
    snapshot: a row written or erased between pages is or is not seen by its position
    (privacy tells an export that a deletion raced; docs/privacy.md §9). The table needs an
    index whose columns after the ``select``'s equalities start with ``first``, or every
    page sorts all the rows the equalities select."""
    first, second = order
    after: tuple[Any, Any] | None = None
    while True:
        with db.transaction(readonly=True) as tx:
            if after is None:
                rows = tx.query(f"{select} ORDER BY {first}, {second} LIMIT ?", (*params, page_rows))
            else:
                # ``first >= last`` is implied by the OR, and said: without it the index on
                # ``first`` is not used as a range, and each page re-reads every row before it
                # (quadratic: a 300,000-event export crawled, session 26).
                rows = tx.query(f"{select} AND {first} >= ? AND ({first} > ? OR ({first} = ? AND {second} > ?)) "
                                f"ORDER BY {first}, {second} LIMIT ?",
                                (*params, after[0], after[0], after[0], after[1], page_rows))
        yield from rows
        if len(rows) < page_rows:
            return
        after = (rows[-1][positions[0]], rows[-1][positions[1]])


def probe(db: Database) -> str:
    """"" when the database answers a trivial query, else why not. In a read transaction:
    on SQLite a write one is BEGIN IMMEDIATE and waited for the database's one write lock,
    so a long write (a big household's Rekey, ~22 s) made this critical check fail and the
    service NOT_SERVING while reads still worked (attack27); whether writes are taken is
    the ``database writes`` check's (WriteHealth). SQLite reads its schema page (a bare
    ``SELECT 1`` in a deferred transaction would not touch the file at all)."""
    try:
        with db.transaction(readonly=True) as tx:
            tx.query("SELECT count(*) FROM sqlite_master" if db.dialect == "sqlite" else "SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return f"{type(exc).__name__}: {exc}"[:200]
    return ""


def clock_offset(db: Database, wall: Callable[[], float] = time.time) -> tuple[float, float] | None:
    """How far this process's wall clock (``wall``) is ahead of the database server's
    (negative: behind), and the measurement's uncertainty (half the round trip), in
    seconds. None on SQLite: its "now" is this process's own clock, nothing to compare
    with (session 25: a privacy replica whose clock disagreed with the others' took
    their deletion leases; services/privacy/deletion/app.py ``clock_disagrees``)."""
    if not isinstance(db, PostgresDatabase):
        return None
    before = wall()
    with db.transaction(readonly=True) as tx:
        server = float(tx.query("SELECT EXTRACT(EPOCH FROM clock_timestamp())")[0][0])
    after = wall()
    return (before + after) / 2.0 - server, (after - before) / 2.0


PENDING_TABLE = "erasures_awaiting_purge"


def record_erasure(tx: Tx) -> None:
    """Note, inside the transaction that deleted rows, that a physical purge is owed
    (``purge_erased``). On PostgreSQL the purge rewrites whole tables, so it runs only
    when something is owed: a retried Erase that finds nothing (its first call purged,
    but the answer was lost or late) does not rewrite again, and an Erase whose purge
    crashed or stopped short leaves the note for the retry to purge. (SQLite's purge, a
    checkpoint, is cheap and always runs: nothing to note.)"""
    if isinstance(tx, _PostgresTx):
        tx.execute(f"INSERT INTO {PENDING_TABLE} (noted_at) VALUES (?)", (time.time(),))


def migrate(db: Database, migrations: Sequence[Migration], personal_tables: Sequence[str] = ()) -> list[int]:
    """Apply the migrations not yet applied, each in its own transaction, in version
    order. Safe with several replicas starting at once: PostgreSQL takes an advisory
    lock, SQLite's BEGIN IMMEDIATE serialises writers. Returns the versions applied.
    ``personal_tables`` (the tables an erasure deletes from) are kept out of PostgreSQL's
    planner statistics (``PostgresDatabase.keep_out_of_statistics``)."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError("migration versions must be unique and increasing")
    types = _TYPES[db.dialect]
    applied: list[int] = []
    with db.transaction() as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                   "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        if db.dialect == "postgres":
            tx.execute(f"CREATE TABLE IF NOT EXISTS {PENDING_TABLE} (id BIGSERIAL PRIMARY KEY, "
                       "noted_at DOUBLE PRECISION NOT NULL)")
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
    if personal_tables and isinstance(db, PostgresDatabase):
        db.keep_out_of_statistics(personal_tables)
    return applied


def schema_version(db: Database) -> int:
    with db.transaction() as tx:
        rows = tx.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(rows[0][0])
