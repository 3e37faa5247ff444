"""Two consent changes of one account at once on PostgreSQL (privacy replicas share it).

review20: ``ConsentStore.change_consent`` read the row's version and flags, then wrote
version + 1. Under PostgreSQL's read committed a second writer read the row while the
first held it, waited at its UPDATE, and then wrote the same version number over the
first's flags — two changes both "version 2" — and its audit record (session 20's
``consent_change`` details) named as ``previous`` flags that were no longer there. The
read now takes the row (``FOR UPDATE``): the second waits and sees the first's write.
(SQLite's write transactions already run one after the other: BEGIN IMMEDIATE.)"""

from __future__ import annotations

import os
import threading
import time

from services.common.storage.sql import PostgresDatabase
from services.privacy.consent.store import ConsentStore
from tests.helpers.waiting import wait_for


def test_concurrent_consent_changes_get_distinct_versions_and_their_true_previous_flags(postgres_dsn):
    db = PostgresDatabase(postgres_dsn, f"consent{os.getpid()}_{time.monotonic_ns()}", max_size=4)
    try:
        store = ConsentStore(db)
        store.migrate()
        account = "acc-consent-race"
        assert store.change_consent(account, True, True, "setup")[1] == 1
        holder_pid, go, first_done = [], threading.Event(), threading.Event()

        def first_writer() -> None:   # another replica's change, its transaction still open
            with db.transaction() as tx:
                holder_pid.append(tx.query("SELECT pg_backend_pid()")[0][0])
                tx.execute("UPDATE consent SET processing = 0, attribution = 1, version = 2 WHERE account_id = ?",
                           (account,))
                go.wait(60)
            first_done.set()

        second: list = []
        first = threading.Thread(target=first_writer)
        first.start()
        wait_for(lambda: holder_pid, what="the first writer holds the row")
        racer = threading.Thread(target=lambda: second.append(store.change_consent(account, False, False, "second")))
        racer.start()

        def blocked() -> bool:   # a transaction of its own a poll: pg_stat_activity is a snapshot per transaction
            with db.transaction() as tx:
                return tx.query("SELECT count(*) FROM pg_stat_activity WHERE ? = ANY(pg_blocking_pids(pid))",
                                (holder_pid[0],))[0][0] >= 1

        wait_for(blocked, what="the second change waiting for the first's row")
        go.set()
        first.join(60)
        racer.join(60)
        assert first_done.is_set() and second, "a writer did not finish"
        before, version = second[0]
        assert version == 3, f"the second change wrote version {version} (the first wrote 2)"
        assert (before.processing, before.attribution, before.version) == (False, True, 2), before
        now = store.consent(account)
        assert (now.processing, now.attribution, now.version) == (False, False, 3), now
    finally:
        db.close()
