"""A slow PostgreSQL against request deadlines (docs/operations.md, "Outages"): within an
RPC no statement outlives the caller's deadline. Found in session 18 driving the mesh
on PostgreSQL while another session held a lock on clustering's ``sessions`` table for
35 s: eight requests waited for the lock long after the gateway had answered 504, each
holding one of the service's eight pooled connections, so the service went NOT_SERVING
and answered 503 on every route ("database unavailable: PoolTimeout") with PostgreSQL
itself fine, and the abandoned writes still committed when the lock went. Real
PostgreSQL (the session fixture); the lock is held by a second connection."""

from __future__ import annotations

import os
import threading
import time

import psycopg
import pytest

from services.common.client import reset_serving_deadline, set_serving_deadline
from services.common.errors import Unavailable
from services.common.storage.sql import PostgresDatabase


@pytest.fixture
def locked(postgres_dsn):
    """A database with tables ``t`` (locked by another session) and ``free``; the lock
    goes after 20 s at the latest, so a regression fails instead of hanging. The third
    item, ``release_after(seconds)``, rolls the locker back from a timer thread.

    Every timer is joined before the locker is closed: ROLLBACK releases the lock before
    its answer reaches the timer's thread, so the test's own read could end, and the
    teardown close the connection, while that thread was still waiting for the answer on
    its socket (psycopg.OperationalError "connection socket closed" in Thread-N, reported
    as pytest's unhandled-thread-exception warning in the fresh-clone CI of session 26)."""
    db = PostgresDatabase(postgres_dsn, f"deadline{os.getpid()}_{time.monotonic_ns()}", max_size=2)
    with db.transaction() as tx:
        tx.execute("CREATE TABLE t (x integer)")
        tx.execute("CREATE TABLE free (x integer)")
        tx.execute("INSERT INTO t VALUES (1)")
        tx.execute("INSERT INTO free VALUES (1)")
    locker = psycopg.connect(postgres_dsn)
    locker.execute(f'LOCK TABLE "{db.schema}".t IN ACCESS EXCLUSIVE MODE')
    timers: list[threading.Timer] = []

    def release_after(seconds: float) -> None:
        timers.append(threading.Timer(seconds, locker.rollback))
        timers[-1].start()

    release_after(20.0)
    yield db, locker, release_after
    for timer in timers:
        timer.cancel()
        timer.join()
    locker.close()
    db.close()


def serving(deadline_s: float, fn):
    token = set_serving_deadline(deadline_s)
    try:
        return fn()
    finally:
        reset_serving_deadline(token)


def read(db, table: str) -> int:
    with db.transaction(readonly=True) as tx:
        return tx.query(f"SELECT count(*) FROM {table}")[0][0]


def test_a_statement_waiting_on_a_lock_ends_at_the_deadline_and_gives_its_connection_back(locked):
    db, _locker, _release = locked
    for _ in range(3):   # more calls than the pool holds: each gives its connection back
        started = time.monotonic()
        with pytest.raises(Unavailable, match="QueryCanceled"):
            serving(0.5, lambda: read(db, "t"))
        assert time.monotonic() - started < 3.0
    started = time.monotonic()   # the pool is not held by the abandoned waits
    assert serving(2.0, lambda: read(db, "free")) == 1
    assert time.monotonic() - started < 1.0


def test_concurrent_waits_end_at_their_deadlines_and_the_database_answers_after_the_lock(locked):
    db, locker, _release = locked
    outcomes = []

    def call():
        try:
            outcomes.append(serving(1.0, lambda: read(db, "t")))
        except Unavailable as exc:
            outcomes.append(str(exc))

    started = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(4)]   # twice the pool
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started < 4.0, outcomes
    assert len(outcomes) == 4 and all(isinstance(o, str) for o in outcomes), outcomes
    locker.rollback()   # the lock goes: the same pool serves at once
    assert serving(2.0, lambda: read(db, "t")) == 1


def test_outside_an_rpc_a_transaction_still_waits_for_the_lock(locked):
    """Background work (refits, outboxes, purges) has no caller deadline: it waits as before."""
    db, locker, release_after = locked
    release_after(1.0)
    started = time.monotonic()
    assert read(db, "t") == 1
    assert time.monotonic() - started >= 0.9


def test_a_call_without_a_deadline_sets_no_statement_timeout(locked):
    """gRPC reports a call without a deadline as one centuries away: no statement_timeout
    (its milliseconds overflowed PostgreSQL's integer: every such call failed INTERNAL,
    e.g. GetAuditProof from a client that set no timeout)."""
    db, locker, release_after = locked
    assert serving(1e18, lambda: read(db, "free")) == 1
    release_after(1.0)
    assert serving(1e18, lambda: read(db, "t")) == 1   # waits for the lock, as outside an RPC
