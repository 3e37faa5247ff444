"""A model refresh reads the household in ONE read transaction that sees one snapshot of the
database (session 34): the feature schema's check, the stored model, the closed sessions and
their feedback labels (which were volunteered, too). Before, each was a read transaction of
its own — five a new household's refresh, with the model cache's re-check after the save —
so a write committed between two of them gave the refresh a view no database state ever
held: here a session's prompted label read before a user's unprompted correction and the
correction's "volunteered" mark read after it, so the fit weighed the prompted person as a
volunteered answer. On PostgreSQL one transaction is not enough: under READ COMMITTED each
statement sees what committed before it, so the snapshot is REPEATABLE READ (read only)."""

from __future__ import annotations

import contextlib
import random
import threading

from services.clustering.modeling import ModelKeeper
from services.clustering.store import ClusteringStore
from services.common.feedback_to_clustering import UNPROMPTED_LABEL_SUFFIX
from tests.helpers.incremental_sessions import random_event
from tests.integration.test_refresh_one_transaction import GAP_S, T0, _household, _store

LABELS_READ = "SELECT session_id, person_id FROM session_labels"


def _write_after(store: ClusteringStore, sql_start: str, write) -> list[str]:
    """From now on, once: right after a statement starting with ``sql_start`` has answered,
    ``write()`` runs and commits on another thread (its own connection) before the reader's
    next statement. Returns the list that says it ran."""
    ran: list[str] = []
    begin = store.db.transaction

    @contextlib.contextmanager
    def hooked(*args, **kwargs):
        with begin(*args, **kwargs) as tx:
            query = tx.query

            def query_then_write(sql, *a, **k):
                rows = query(sql, *a, **k)
                if sql.startswith(sql_start) and not ran:
                    ran.append(sql)
                    writer = threading.Thread(target=write)
                    writer.start()
                    writer.join(30)
                    assert not writer.is_alive(), "the concurrent write did not finish"
                return rows
            tx.query = query_then_write
            yield tx
    store.db.transaction = hooked
    return ran


def _snapshots(keeper: ModelKeeper) -> list:
    """The Snapshot each refresh hands to ``advance`` (what it fits on)."""
    seen = []
    advance = keeper.advance

    def advance_seen(current, snap, *args, **kwargs):
        seen.append(snap)
        return advance(current, snap, *args, **kwargs)
    keeper.advance = advance_seen
    return seen


def test_a_write_between_the_refreshs_reads_does_not_mix_into_what_it_fits(database):
    store = _store(database)
    _household(store, "acc-1")
    keeper = ModelKeeper(store, lambda _account: "gmm")
    assert keeper.refresh("acc-1")[0] == 1
    target = store.closed_sessions("acc-1")[3].session_id
    assert store.record_labels([("acc-1", target, "p-prompted", "feedback")]) == (1, 0)
    ran = _write_after(store, LABELS_READ, lambda: store.record_labels(
        [("acc-1", target, "p-volunteered", "feedback" + UNPROMPTED_LABEL_SUFFIX)]))
    seen = _snapshots(keeper)
    keeper.refresh("acc-1", force="labels")
    assert ran and seen, (ran, seen)
    snap = seen[0]
    at = [s.session_id for s in snap.sessions].index(target)
    volunteered = bool(snap.volunteered[at]) if snap.volunteered is not None else False
    # One state or the other — before the correction, or after it — never the prompted
    # person marked volunteered (before: ("p-prompted", True)).
    assert (snap.labels[at], volunteered) in {("p-prompted", False), ("p-volunteered", True)}, \
        (snap.labels[at], volunteered)
    store.db.transaction = type(store.db).transaction.__get__(store.db)
    assert store.labels("acc-1")[target] == "p-volunteered"   # the write did commit


def _transactions(store: ClusteringStore) -> list[str]:
    """"read" or "write" for each transaction opened from now on."""
    opened: list[str] = []
    begin = store.db.transaction

    def counted(*args, **kwargs):
        readonly = kwargs.get("readonly", args[0] if args else False)
        opened.append("read" if readonly else "write")
        return begin(*args, **kwargs)
    store.db.transaction = counted
    return opened


def test_a_first_fit_and_an_arrivals_refresh_each_read_in_one_transaction(database):
    """A new household's refresh (a first fit and save): its reads, the save, then the model
    cache's re-check of the household's erasures (it must follow the cache write) — before,
    four reads ahead of the write. Then the usual refresh of a stream's batch: the model
    stays, the sessions closed since are answered by it (``ModelKeeper._arrivals``); its
    reads — the schema check, the model's version, the closed tail and its labels — are one
    transaction, then its one write (before: three reads)."""
    store = _store(database)
    _household(store, "acc-2")
    opened = _transactions(store)
    assert ModelKeeper(store, lambda _account: "gmm").refresh("acc-2")[0] == 1
    assert opened == ["read", "write", "read"], opened
    keeper = ModelKeeper(store, lambda _account: "gmm")
    rng = random.Random("acc-2-more")
    # one more closed session (not enough to fold in), then the refresh the batch schedules
    store.ingest([random_event(rng, "acc-2", 100 + i, T0 + (12 + i) * 2 * GAP_S, device="tv-1") for i in range(2)])
    opened.clear()
    assert keeper.refresh("acc-2")[0] == 1
    assert opened[0] == "read" and opened.count("read") == 1, opened


def test_a_snapshot_transaction_sees_one_state_and_leaves_its_connection_writable(database):
    """``Database.transaction(snapshot=True)``: a write committed after its first statement
    is not seen by its later ones (PostgreSQL: REPEATABLE READ; at the default READ
    COMMITTED the second count was 1), and the pooled connection it used goes back to
    read-write transactions (the isolation and read-only mode are reset)."""
    with database.transaction() as tx:
        tx.execute("CREATE TABLE snapshot_probe (x INTEGER)")

    def insert() -> None:
        with database.transaction() as tx:
            tx.execute("INSERT INTO snapshot_probe (x) VALUES (1)")
    with database.transaction(readonly=True, snapshot=True) as tx:
        assert tx.query("SELECT COUNT(*) FROM snapshot_probe")[0][0] == 0
        writer = threading.Thread(target=insert)
        writer.start()
        writer.join(30)
        assert tx.query("SELECT COUNT(*) FROM snapshot_probe")[0][0] == 0
    with database.transaction(readonly=True) as tx:
        assert tx.query("SELECT COUNT(*) FROM snapshot_probe")[0][0] == 1
    for _ in range(8):   # this thread's connection (SQLite) / the pool's (PostgreSQL) write again
        insert()
    with database.transaction(readonly=True) as tx:
        assert tx.query("SELECT COUNT(*) FROM snapshot_probe")[0][0] == 9
