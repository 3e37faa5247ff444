"""Closing storage while other threads still use it is safe (the feedback refit thread
once had its SQLite connection closed under it by shutdown: a segmentation fault).

The hammering runs in a child interpreter so that a crash fails this test (exit status
-11) instead of killing the whole test run. Every backend: SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.common.errors import Unavailable
from services.common.storage.sql import PostgresDatabase, SqliteDatabase
from tests.helpers.held_transaction import transaction_held_open
from tests.helpers.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]

HAMMER = r'''
import json, sys, threading, time
from services.common.errors import Unavailable
from services.common.storage.sql import PostgresDatabase, SqliteDatabase

kind, target, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
outcomes = {"committed": 0, "refused": 0, "other": []}
lock = threading.Lock()
for r in range(rounds):
    db = (SqliteDatabase(f"{target}/db{r}.sqlite") if kind == "sqlite"
          else PostgresDatabase(target, f"close_{r}_{time.monotonic_ns()}", max_size=4))
    with db.transaction() as tx:
        tx.execute("CREATE TABLE t (worker INTEGER, n INTEGER, pad TEXT)")
    acked = {}

    def work(worker):
        n = 0
        while True:
            try:
                with db.transaction() as tx:
                    # Long enough statements that close() lands in the middle of one.
                    tx.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) "
                             "SELECT SUM(x) FROM c")
                    tx.execute("INSERT INTO t VALUES (?, ?, ?)", (worker, n, "x" * 200))
                n += 1
                with lock:
                    outcomes["committed"] += 1
                acked[worker] = n
            except Unavailable:
                with lock:
                    outcomes["refused"] += 1
                return
            except Exception as exc:  # anything else is a failure of close()
                with lock:
                    outcomes["other"].append(repr(exc))
                return

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.05 + 0.01 * r)
    db.close()
    for t in threads:
        t.join(60)
    # Every acknowledged transaction is durable: reopen and count.
    again = (SqliteDatabase(f"{target}/db{r}.sqlite") if kind == "sqlite"
             else PostgresDatabase(target, db.schema, max_size=1))
    with again.transaction() as tx:
        rows = dict(tx.query("SELECT worker, COUNT(*) FROM t GROUP BY worker"))
    again.close()
    for worker, n in acked.items():
        if rows.get(worker, 0) < n:
            outcomes["other"].append(f"lost acknowledged rows of worker {worker}")
print(json.dumps(outcomes))
'''


def _hammer(kind: str, target: str, rounds: int) -> dict:
    done = subprocess.run([sys.executable, "-c", HAMMER, kind, target, str(rounds)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sqlite_close_under_concurrent_use_neither_crashes_nor_loses_acknowledged_writes(tmp_path):
    outcome = _hammer("sqlite", str(tmp_path), rounds=15)
    assert outcome["other"] == []
    # close() really happened in the middle of use: threads were refused afterwards.
    assert outcome["refused"] == 15 * 6 and outcome["committed"] > 0


@pytest.mark.postgres
def test_postgres_close_under_concurrent_use_neither_crashes_nor_loses_acknowledged_writes(postgres_dsn):
    outcome = _hammer("postgres", postgres_dsn, rounds=5)
    assert outcome["other"] == []
    assert outcome["refused"] == 5 * 6 and outcome["committed"] > 0


def test_close_waits_for_a_transaction_in_flight_then_refuses_new_ones(tmp_path):
    db = SqliteDatabase(tmp_path / "db.sqlite")
    with db.transaction() as tx:
        tx.execute("CREATE TABLE t (x INTEGER)")
    closer = threading.Thread(target=db.close)
    with transaction_held_open(db, lambda tx: tx.execute("INSERT INTO t VALUES (1)"), hold_s=10):
        closer.start()
        # close() has begun (a fixed 0.2 s sleep let a slow machine ask for the next transaction
        # before the closer had run, and that one was not refused) ...
        wait_for(lambda: db._closed, what="close() to begin", interval_s=0.01)
        time.sleep(0.2)
        assert closer.is_alive()  # ... and waits for the transaction in flight, not closing under it
        with pytest.raises(Unavailable):
            with db.transaction():
                pass
    closer.join(10)
    assert not closer.is_alive()
    again = SqliteDatabase(tmp_path / "db.sqlite")
    with again.transaction() as tx:
        assert tx.query("SELECT COUNT(*) FROM t") == [(1,)]
    again.close()


def test_close_that_times_out_leaves_the_busy_connection_to_its_thread(tmp_path):
    db = SqliteDatabase(tmp_path / "db.sqlite")
    with db.transaction() as tx:
        tx.execute("CREATE TABLE t (x INTEGER)")
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_writer():
        try:
            with db.transaction() as tx:
                inside.set()
                release.wait(10)
                tx.execute("INSERT INTO t VALUES (2)")  # still usable after close() returned
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert inside.wait(10)
    db.close(timeout_s=0.1)  # returns without closing the busy connection
    release.set()
    writer.join(10)
    assert errors == []
    assert db._all == []  # the writer's thread closed its connection when it finished
    again = SqliteDatabase(tmp_path / "db.sqlite")
    with again.transaction() as tx:
        assert tx.query("SELECT x FROM t") == [(2,)]
    again.close()


def test_a_metrics_scrape_after_the_deletion_store_closed_still_succeeds(tmp_path):
    # The overdue-jobs gauge is read by every Prometheus scrape, from the scraping thread; a
    # store that is closing (shutdown, or an in-process app torn down) must not fail the whole
    # scrape of the process's registry.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from prometheus_client import REGISTRY

    from services.privacy.consent.store import ConsentStore
    from services.privacy.deletion.app import (OLDEST_OPEN_JOB_AGE, PEER_SERVICES, WAITING_LABELS,
                                               DeletionCoordinator, GrpcPeers)
    from services.privacy.deletion.store import DeletionJobStore

    db = SqliteDatabase(tmp_path / "privacy.sqlite")
    ConsentStore(db, None).migrate()
    coordinator = DeletionCoordinator(DeletionJobStore(db), GrpcPeers({s: "127.0.0.1:9" for s in PEER_SERVICES}, 1.0), None,
                                      Ed25519PrivateKey.generate())
    for label, waiting in WAITING_LABELS.items():
        OLDEST_OPEN_JOB_AGE.labels(label).set_function(lambda waiting=waiting: coordinator.oldest_open_age_s(waiting))
    try:
        for label in WAITING_LABELS:
            assert REGISTRY.get_sample_value("hearth_deletion_oldest_open_job_age_seconds", {"waiting": label}) == 0.0
        db.close()
        for label in WAITING_LABELS:
            value = REGISTRY.get_sample_value("hearth_deletion_oldest_open_job_age_seconds", {"waiting": label})
            assert value != value  # NaN: unknown, not a made-up age
    finally:
        for label in WAITING_LABELS:
            OLDEST_OPEN_JOB_AGE.labels(label).set_function(lambda: 0.0)
