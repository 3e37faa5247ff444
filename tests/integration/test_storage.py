"""One storage suite over every backend: SQLite and PostgreSQL for the repositories,
in-process and Redis for caches. Real servers, started by tests/conftest.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.attribution.domain.records import Conversion, Touchpoint
from services.attribution.store import AttributionStore
from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore, DriftRow
from services.common.errors import AlreadyExists, Conflict, NotFound
from services.common.storage.sql import Migration, migrate, schema_version
from services.feedback.store import FeedbackStore, PredictionRecord
from services.privacy.consent.store import ConsentStore
from tests.helpers.held_transaction import transaction_held_open
from tests.helpers.waiting import wait_for

T0 = time.time() - 7 * 86400


def ev(i: int, ts: float, device: str = "tv-1", account: str = "acc-1", **kw) -> ViewingEvent:
    return ViewingEvent(event_id=f"{account}-{device}-e{i}", account_id=account, device_id=device,
                        device_type=kw.pop("device_type", "tv"), ts=ts, kind="heartbeat",
                        title_id=kw.pop("title_id", f"t{i}"), genres=("drama",), duration_s=60.0, **kw)


@pytest.fixture
def store(database, cache):
    s = ClusteringStore(database, cache, gap_s=1800, lateness_tolerance_s=6 * 3600)
    s.migrate()
    return s


def test_migrations_apply_once_and_record_version(database):
    migrations = [Migration(1, "a", "CREATE TABLE a (x INTEGER)"),
                  Migration(2, "b", "CREATE TABLE b (y {double});\nCREATE INDEX b_y ON b (y)")]
    assert migrate(database, migrations) == [1, 2]
    assert migrate(database, migrations) == []
    assert schema_version(database) == 2
    with pytest.raises(ValueError):
        migrate(database, [Migration(2, "x", ""), Migration(1, "y", "")])


def test_failed_transaction_writes_nothing(database):
    migrate(database, [Migration(1, "t", "CREATE TABLE t (id TEXT PRIMARY KEY)")])
    with pytest.raises(RuntimeError):
        with database.transaction() as tx:
            tx.execute("INSERT INTO t (id) VALUES (?)", ("a",))
            raise RuntimeError("boom")
    with database.transaction() as tx:
        assert tx.query("SELECT COUNT(*) FROM t") == [(0,)]


def test_a_household_lock_makes_an_erasure_wait_for_a_write_in_flight(database):
    """A write holding the household lock commits before an erasure of that household
    deletes: the erasure's DELETE sees its rows. Without the lock, PostgreSQL's read
    committed lets the DELETE miss rows inserted but not yet committed, and they stay
    after the erasure (a device that keeps sending during a household deletion)."""
    import threading

    migrate(database, [Migration(1, "t", "CREATE TABLE t (account_id TEXT, n INTEGER)")])
    inserted, erasing_done = threading.Event(), threading.Event()

    def erase():
        inserted.wait(10)
        with database.transaction() as tx:
            tx.lock_household("hh-1")
            tx.execute("DELETE FROM t WHERE account_id = ?", ("hh-1",))
        erasing_done.set()

    eraser = threading.Thread(target=erase)
    eraser.start()
    with database.transaction() as tx:
        tx.lock_household("hh-1")
        tx.execute("INSERT INTO t (account_id, n) VALUES (?, ?)", ("hh-1", 1))
        inserted.set()
        assert not erasing_done.wait(0.5)          # the erasure waits for this write
    eraser.join(10)
    assert erasing_done.is_set()
    with database.transaction() as tx:
        assert tx.query("SELECT COUNT(*) FROM t WHERE account_id = ?", ("hh-1",)) == [(0,)]


def test_a_household_lock_holds_within_a_service_and_not_across_services(postgres_dsn):
    """The household lock is the service's own: PostgreSQL's advisory locks are per
    database and the services share one (a schema each). Until session 24 a clustering
    transaction frozen while holding a household's lock (its process SIGSTOPped, as
    tests/e2e/test_deletion_e2e.py's hung peer) blocked attribution's erasure of that
    household for as long as it stayed frozen — the deletion job's attribution step timed out
    again and again (a fresh-machine drill failed on it)."""
    import uuid

    from services.common.storage.sql import PostgresDatabase

    tag = uuid.uuid4().hex[:8]
    clustering = PostgresDatabase(postgres_dsn, f"lockc_{tag}", max_size=2)
    attribution = PostgresDatabase(postgres_dsn, f"locka_{tag}", max_size=2)
    clustering_again = PostgresDatabase(postgres_dsn, f"lockc_{tag}", max_size=2)

    def locker(database, done):
        with database.transaction() as tx:
            tx.lock_household("hh-1")
        done.set()

    other_service, same_service = threading.Event(), threading.Event()
    with transaction_held_open(clustering, lambda tx: tx.lock_household("hh-1")):   # a frozen writer
        threading.Thread(target=locker, args=(attribution, other_service), daemon=True).start()
        threading.Thread(target=locker, args=(clustering_again, same_service), daemon=True).start()
        assert other_service.wait(10), "another service's transaction waited for clustering's household lock"
        assert not same_service.wait(0.5), "the household lock no longer serialises one service's writers"
    assert same_service.wait(10)

    # A rolling upgrade: a replica older than session 24 locks the household's key alone,
    # exclusively; a newer replica of its service must still wait for it.
    newer = threading.Event()
    with transaction_held_open(clustering, lambda tx: tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", ("household:hh-1",))):
        threading.Thread(target=locker, args=(clustering_again, newer), daemon=True).start()
        assert not newer.wait(0.5), "a newer replica's write did not wait for an older replica's lock"
    assert newer.wait(10)
    for database in (clustering, attribution, clustering_again):
        database.close()


def _two_replicas(database, store_class):
    """Two replicas of a store on one database, each with its own cached data keys, and
    the key ring behind them (privacy's)."""
    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.keys import ring_fetcher

    ring = KeyRing([generate_kek("k1")], "k1")
    replicas = [store_class(database, cipher=FieldCipher(ring_fetcher(ring, []))) for _ in range(2)]
    replicas[0].migrate()
    return ring, replicas


def _erase_on_the_first(ring, replicas, account):
    """A household deletion as the job runs it: the key shredded first, then the Erase,
    which reaches one replica only."""
    from services.common.erasure import ErasureScope
    from tests.helpers.keys import NOW

    ring.destroy_dek(account, NOW)
    replicas[0].erase(ErasureScope(account, "household"))


def test_a_clustering_replica_that_did_not_run_the_erase_cannot_keep_writing_for_the_household(database):
    """The other replica still has the household's key cached. Its next write must be
    refused and leave nothing: the Erase bumped the store's household_erasures count, and
    a write that sees it move drops its cached keys and has to fetch the destroyed one
    (with only the erasing replica forgetting its key, the other went on writing for up
    to a minute)."""
    from services.common.errors import FailedPrecondition

    ring, replicas = _two_replicas(database, ClusteringStore)
    replicas[1].ingest([ev(0, T0, account="acc-r"), ev(1, T0, account="acc-other")])     # both keys cached
    _erase_on_the_first(ring, replicas, "acc-r")
    with pytest.raises(FailedPrecondition):
        replicas[1].ingest([ev(2, T0 + 60, account="acc-r")])
    with database.transaction() as tx:
        for table in ("events", "sessions", "devices"):
            assert tx.query(f"SELECT COUNT(*) FROM {table} WHERE account_id = ?", ("acc-r",)) == [(0,)], table
    assert replicas[1].ingest([ev(3, T0 + 60, account="acc-other")]).accepted == 1   # other households go on


def test_an_attribution_replica_that_did_not_run_the_erase_cannot_keep_writing_for_the_household(database):
    from services.common.errors import FailedPrecondition

    ring, replicas = _two_replicas(database, AttributionStore)
    replicas[1].record_touchpoints([Touchpoint("tp-0", "acc-r", "tv-1", T0, "email", "c")])   # key cached
    _erase_on_the_first(ring, replicas, "acc-r")
    with pytest.raises(FailedPrecondition):
        replicas[1].record_touchpoints([Touchpoint("tp-1", "acc-r", "tv-1", T0 + 60, "email", "c")])
    with pytest.raises(FailedPrecondition):
        replicas[1].record_conversions([Conversion("cv-1", "acc-r", T0 + 60, "purchase", 1.0, "tv-1")])
    with database.transaction() as tx:
        for table in ("touchpoints", "conversions"):
            assert tx.query(f"SELECT COUNT(*) FROM {table} WHERE account_id = ?", ("acc-r",)) == [(0,)], table


def test_ingest_builds_sessions_and_ignores_duplicates(store):
    events = [ev(i, T0 + i * 600) for i in range(4)] + [ev(10, T0 + 10_000)]
    result = store.ingest(events)
    assert (result.accepted, result.duplicates, result.rejected_late) == (5, 0, 0)
    again = store.ingest(events[:3])
    assert (again.accepted, again.duplicates) == (0, 3)
    view = store.household("acc-1")
    assert [s.event_count for s in view.sessions] == [1, 4]       # newest first
    assert all(s.closed for s in view.sessions)
    assert view.devices[0].session_count == 2
    assert view.sessions[1].features.shape == (35,)


def test_event_older_than_retention_is_refused_as_expired_and_not_stored(database, cache):
    """docs/privacy.md §7: an event already older than the retention window is refused at
    ingest (the purge would erase it), counted apart, and moves no watermark; a recent
    event of the same batch is stored."""
    store = ClusteringStore(database, cache, gap_s=1800, lateness_tolerance_s=6 * 3600, retention_s=90 * 86400.0)
    store.migrate()
    now = time.time()
    old, recent = ev(1, now - 100 * 86400, account="acc-exp"), ev(2, now - 2 * 86400, account="acc-exp")
    result = store.ingest([old, recent])
    assert (result.accepted, result.duplicates, result.rejected_late, result.rejected_expired) == (1, 0, 0, 1)
    view = store.household("acc-exp")
    assert sum(s.event_count for s in view.sessions) == 1
    assert view.sessions[0].start_ts == recent.ts
    assert store.ingest([old]).rejected_expired == 1                # still refused, never a duplicate
    only_old = store.ingest([ev(3, now - 120 * 86400, account="acc-exp-2")])
    assert (only_old.accepted, only_old.rejected_expired) == (0, 1)
    with pytest.raises(NotFound):                                   # nothing stored: no household
        store.household("acc-exp-2")
    # Retention purge off (no retention_s): nothing is refused for its age.
    keep_all = ClusteringStore(database, cache, gap_s=1800, lateness_tolerance_s=6 * 3600)
    kept = keep_all.ingest([ev(4, now - 100 * 86400, account="acc-exp-3")])
    assert (kept.accepted, kept.rejected_expired) == (1, 0)


def test_late_event_within_tolerance_bridges_sessions_beyond_is_refused(store):
    store.ingest([ev(1, T0), ev(2, T0 + 3000)])                     # gap 3000 s > 1800: two sessions
    assert len(store.household("acc-1").sessions) == 2
    bridged = store.ingest([ev(3, T0 + 1500)])                       # within tolerance, bridges them
    assert bridged.accepted == 1
    sessions = store.household("acc-1").sessions
    assert [s.event_count for s in sessions] == [3]
    store.ingest([ev(4, T0 + 10 * 3600)])                            # watermark moves on
    refused = store.ingest([ev(5, T0 + 3600)])                       # 9 h late > 6 h tolerance
    assert (refused.accepted, refused.rejected_late) == (0, 1)
    assert sum(s.event_count for s in store.household("acc-1").sessions) == 4


def test_unknown_household_is_not_found(store):
    with pytest.raises(NotFound) as info:
        store.household("nobody")
    assert info.value.field == "account_id"


def test_devices_are_separate_session_streams(store):
    store.ingest([ev(1, T0, device="tv-1"), ev(2, T0 + 60, device="phone-1", device_type="mobile")])
    view = store.household("acc-1")
    assert sorted(d.device_id for d in view.devices) == ["phone-1", "tv-1"]
    assert len(view.sessions) == 2


def test_model_compare_and_swap_and_cache(store):
    assert store.get_model("acc-1") is None
    with pytest.raises(Conflict):   # no sessions, no model (an erased household stays erased)
        store.save_model("acc-1", 0, "gmm", b"orphan")
    store.ingest([ev(0, T0)])
    v1 = store.save_model("acc-1", 0, "gmm", b"one")
    assert v1 == 1 and store.get_model("acc-1").blob == b"one"
    with pytest.raises(Conflict):
        store.save_model("acc-1", 0, "gmm", b"stale")
    assert store.save_model("acc-1", 1, "kmeans", b"two") == 2
    model = store.get_model("acc-1")
    assert (model.version, model.variant, model.blob) == (2, "kmeans", b"two")


class _EraseWhileCaching:
    """The store's real cache, with a household erased (by another replica) at the moment
    the store writes a model into it: after its read or save committed, before the entry
    lands."""

    def __init__(self, cache, erase) -> None:
        self._cache, self._erase, self.fired = cache, erase, False

    def set(self, key, value, ttl_s=None):
        if key.startswith("model:") and not self.fired:
            self.fired = True
            self._erase()
        return self._cache.set(key, value, ttl_s)

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _model_cached_during(reader, hooked, account: str, version: int, path: str) -> None:
    """``reader`` reads (``path`` "read") or saves the household's model, and ``hooked``
    fires the race (another replica's Erase or Rekey) after that committed, before the
    copy lands in the cache: the copy must not stay there."""
    if path == "read":
        assert reader.get_model(account).version == version      # read before the race committed
    else:
        assert reader.save_model(account, version, "gmm", b"newer") == version + 1
    assert hooked.fired
    assert hooked.get(f"model:{account}") is None


@pytest.mark.parametrize("path", ["read", "save"])
def test_a_model_cached_while_its_household_is_erased_does_not_stay_in_the_cache(database, cache, path):
    """Erase drops the cached model after its commit, but a model read or saved just
    before it may reach the cache after that: the store checks the household-erasure
    count again once it cached, and drops the entry (a sealed model under a key naming
    the erased account stayed until its TTL)."""
    from services.common.erasure import ErasureScope

    eraser = ClusteringStore(database, cache, gap_s=1800)
    eraser.migrate()
    eraser.ingest([ev(0, T0, account="acc-c")])
    version = eraser.save_model("acc-c", 0, "gmm", b"model")
    cache.delete("model:acc-c")
    hooked = _EraseWhileCaching(cache, lambda: eraser.erase(ErasureScope("acc-c", "household")))
    _model_cached_during(ClusteringStore(database, hooked, gap_s=1800), hooked, "acc-c", version, path)
    assert eraser.get_model("acc-c") is None


@pytest.mark.parametrize("path", ["read", "save"])
def test_a_model_cached_while_its_household_is_rekeyed_does_not_stay_in_the_cache(database, cache, path):
    """The same race with a data key rotation's Rekey (another replica) instead of an
    erasure: the model read or saved just before it is sealed under the version the
    rotation destroys next, so its copy must not land in the cache after the Rekey dropped
    it. Since session 27 a Rekey moves the household's own re-key count, not the
    store's household-erasure count, and the check reads both (without the household's
    count the stale copy stayed in the cache)."""
    from datetime import UTC, datetime

    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.keys import ring_fetcher

    ring = KeyRing([generate_kek("k")], "k")
    rekeyer = ClusteringStore(database, cache, gap_s=1800, cipher=FieldCipher(ring_fetcher(ring, [])))
    rekeyer.migrate()
    rekeyer.ingest([ev(0, T0, account="acc-k")])
    version = rekeyer.save_model("acc-k", 0, "gmm", b"model")
    cache.delete("model:acc-k")
    ring.create_dek("acc-k", datetime.now(UTC))            # a rotation's version 2
    hooked = _EraseWhileCaching(cache, lambda: rekeyer.rekey("acc-k", 2))
    reader = ClusteringStore(database, hooked, gap_s=1800, cipher=FieldCipher(ring_fetcher(ring, [])))
    _model_cached_during(reader, hooked, "acc-k", version, path)


def test_model_blob_is_skipped_only_for_the_version_the_caller_holds(store, database):
    store.ingest([ev(0, T0)])
    store.save_model("acc-1", 0, "gmm", b"one")
    assert store.save_model("acc-1", 1, "kmeans", b"two") == 2
    held = store.get_model("acc-1", decoded_version=2)          # from the cache
    assert (held.version, held.variant, held.blob) == (2, "kmeans", b"")
    store.cache.delete("model:acc-1")
    assert store.get_model("acc-1", decoded_version=2).blob == b""   # from the table
    assert store.get_model("acc-1", decoded_version=1).blob == b"two"
    # Another replica (its own store and cache) saves a newer version: whoever holds
    # version 2 gets the new blob, never a stale answer.
    other = ClusteringStore(database, gap_s=1800, lateness_tolerance_s=6 * 3600)
    assert other.save_model("acc-1", 2, "gmm", b"three") == 3
    store.cache.delete("model:acc-1")
    newer = store.get_model("acc-1", decoded_version=2)
    assert (newer.version, newer.blob) == (3, b"three")


def test_labelled_session_reads_the_session_and_its_feedback_label(store):
    store.ingest([ev(0, T0), ev(1, T0 + 60), ev(2, T0 + 7200, device="phone-1", device_type="mobile")])
    sessions = {s.device_id: s.session_id for s in store.household("acc-1").sessions}
    session, label = store.labelled_session("acc-1", sessions["tv-1"])
    assert (session.session_id, session.event_count, label) == (sessions["tv-1"], 2, None)
    assert store.record_labels([("acc-1", sessions["tv-1"], "p2", "test")]) == (1, 0)
    assert store.labelled_session("acc-1", sessions["tv-1"])[1] == "p2"
    assert store.labelled_session("acc-1", sessions["phone-1"])[1] is None
    with pytest.raises(NotFound):
        store.labelled_session("acc-1", "no-such-session")


def test_concurrent_updates_of_one_household_both_survive(store):
    """Two writers append to one model blob with read-modify-CAS; neither is lost."""
    store.ingest([ev(0, T0)])
    store.save_model("acc-1", 0, "gmm", b"")
    barrier = threading.Barrier(2)

    def writer(tag: bytes) -> None:
        barrier.wait()
        for _ in range(20):
            while True:
                current = store.get_model("acc-1")
                try:
                    store.save_model("acc-1", current.version, "gmm", current.blob + tag)
                    break
                except Conflict:
                    continue

    threads = [threading.Thread(target=writer, args=(t,)) for t in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.get_model("acc-1")
    assert final.version == 41
    assert final.blob.count(b"a") == 20 and final.blob.count(b"b") == 20


def test_drift_events_round_trip(store):
    store.add_drift_event("acc-1", DriftRow("sudden", 0.9, 3.2, T0, True))
    store.add_drift_event("acc-1", DriftRow("gradual", 0.4, 1.1, T0 + 10, False))
    rows = store.drift_events("acc-1")
    assert [r.drift_type for r in rows] == ["gradual", "sudden"]
    assert rows[1].refit_triggered is True


def test_cache_backends(cache):
    # A TTL long enough that a loaded machine reads the key back before it lapses (0.05 s
    # failed when the test process was descheduled between set and get), then polled until
    # it lapses: the expiry is what is asserted, not how fast this machine is.
    cache.set("a:1", b"x")
    cache.set("a:2", b"y", ttl_s=1.0)
    cache.set("b:1", b"z")
    assert cache.get("a:1") == b"x" and cache.get("a:2") == b"y"
    assert sorted(cache.keys("a:")) == ["a:1", "a:2"]
    wait_for(lambda: cache.get("a:2") is None, timeout_s=30, what="the 1 s TTL of a:2 to lapse",
             interval_s=0.05)
    assert cache.get("a:1") == b"x"     # keys without a TTL stay
    assert cache.delete_prefix("a:") >= 1
    assert cache.get("a:1") is None and cache.get("b:1") == b"z"
    assert cache.delete("b:1") == 1


def test_attribution_store_idempotent(database):
    store = AttributionStore(database)
    store.migrate()
    tps = [Touchpoint(f"tp{i}", "acc-1", "tv-1", T0 + i, "search") for i in range(3)]
    assert store.record_touchpoints(tps) == (3, 0)
    assert store.record_touchpoints(tps) == (0, 3)
    assert store.record_conversions([Conversion("c1", "acc-1", T0 + 10, "subscribe", 9.99)]) == (1, 0)
    loaded_tps, loaded_conv = store.load(["acc-1"], None, None, 86400)
    assert [t.touchpoint_id for t in loaded_tps] == ["tp0", "tp1", "tp2"]
    assert loaded_conv[0].value == pytest.approx(9.99)


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "sealed"])
def test_an_erased_touchpoint_or_conversion_sent_again_is_a_duplicate(database, keyed):
    """chaos23: as for clustering's events, a touchpoint or conversion a device, person or
    window erasure deleted was stored again when sent again (a retry, a replay); now it is a
    duplicate (a keyed digest of its id is kept, never the id); new ones are stored."""
    from services.common.erasure import ErasureScope
    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.keys import ring_fetcher

    cipher = FieldCipher(ring_fetcher(KeyRing([generate_kek("k")], "k"), []), ttl_s=60) if keyed else None
    store = AttributionStore(database, cipher=cipher)
    store.migrate()
    a = "acc-replay"
    tps = [Touchpoint(f"tp{i}", a, "tab-2" if i % 2 else "tv-1", T0 + i * 60, "search", person_id="p1" if i == 4 else None)
           for i in range(6)]
    conv = [Conversion("c-tab", a, T0 + 30, "subscribe", 9.99, "tab-2"), Conversion("c-tv", a, T0 + 90, "subscribe", 5.0, "tv-1")]
    assert store.record_touchpoints(tps) == (6, 0) and store.record_conversions(conv) == (2, 0)
    store.erase(ErasureScope(a, "device", device_id="tab-2"))
    assert store.record_touchpoints(tps) == (0, 6)                   # tp1, tp3, tp5 erased: not back
    assert store.record_conversions(conv) == (0, 2)
    store.erase(ErasureScope(a, "person", person_id="p1"))
    store.erase(ErasureScope(a, "window", start=T0, end=T0 + 1))
    assert store.record_touchpoints(tps) == (0, 6)
    loaded_tps, loaded_conv = store.load([a], None, None, 86400)
    assert [t.touchpoint_id for t in loaded_tps] == ["tp2"] and [c.conversion_id for c in loaded_conv] == ["c-tv"]
    # new: recorded after the device's erasure (what it recorded before is fenced off, session 31)
    assert store.record_touchpoints([Touchpoint("tp9", a, "tab-2", time.time(), "search")]) == (1, 0)
    with database.transaction() as tx:
        rows = tx.query("SELECT digest FROM erased_records WHERE account_id = ?", (a,))
    # The erased ids' keyed digests, and nothing else: not the ids (a search of each digest's
    # bytes for "tp" failed by chance once in ~350 runs: 2 bytes in 6 random 32-byte values).
    digests = {bytes(r[0]) for r in rows}
    assert len(rows) == 6 and digests == (set(store._digests(a, "touchpoint", ["tp0", "tp1", "tp3", "tp4", "tp5"]).values())
                                          | set(store._digests(a, "conversion", ["c-tab"]).values()))
    assert all(len(d) == 32 for d in digests)
    store.erase(ErasureScope("*", "window", end=time.time() + 3600))   # the retention purge, later
    assert _count(database, "erased_records", a) == 0
    assert store.record_touchpoints([Touchpoint("tp10", a, "tab-3", T0, "search")]) == (1, 0)
    store.erase(ErasureScope(a, "device", device_id="tab-3"))
    assert _count(database, "erased_records", a) == 1
    store.erase(ErasureScope(a, "household"))
    assert _count(database, "erased_records", a) == 0


def test_an_erasure_that_deletes_nothing_needs_no_data_key(database):
    """review23: chaos23's erased-record digests asked the key service for the household's
    data key at every device, person or window erasure, even one that deleted nothing:
    such an erasure of a household erased before (its key shredded) failed with
    FAILED_PRECONDITION, and one of an account attribution never held created a data key
    for it. The key is needed only for digests of deleted ids."""
    from datetime import UTC, datetime

    from services.common.erasure import ErasureScope
    from services.common.errors import FailedPrecondition
    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.keys import ring_fetcher

    ring, fetched = KeyRing([generate_kek("k")], "k"), []
    store = AttributionStore(database, cipher=FieldCipher(ring_fetcher(ring, fetched), ttl_s=60))
    store.migrate()
    a = "acc-shredded"
    assert store.record_touchpoints([Touchpoint("tp1", a, "tv-1", T0, "search", campaign="c1")]) == (1, 0)
    store.erase(ErasureScope(a, "household"))
    ring.destroy_dek(a, datetime.now(UTC))
    store.cipher.forget(a)
    for scope in (ErasureScope(a, "device", device_id="tv-1"), ErasureScope(a, "person", person_id="p1"),
                  ErasureScope(a, "window", start=T0 - 60, end=T0 + 60)):
        assert store.erase(scope).empty                     # nothing left to erase: no key asked
    with pytest.raises(FailedPrecondition):                 # the shredded key still refuses writes
        store.record_touchpoints([Touchpoint("tp2", a, "tv-1", T0, "search", campaign="c1")])
    fetched.clear()
    store.erase(ErasureScope("acc-never-seen", "device", device_id="tv-1"))
    assert not ring.has_dek("acc-never-seen") and not fetched


def test_feedback_store_idempotent(database):
    fb = FeedbackStore(database)
    fb.migrate()
    p = PredictionRecord("pr1", "acc-1", "s1", "p1", {"p1": 0.8, "p2": 0.2}, "gmm", 3, T0, False, 2)
    assert fb.record_predictions([p, p]) == (1, 1)
    # the id with other content: refused naming the item, nothing of the batch stored (session 33)
    other = PredictionRecord("pr1", "acc-1", "s1", "p1", {"p1": 0.7, "p2": 0.3}, "gmm", 3, T0, False, 2)
    fresh = PredictionRecord("pr2", "acc-1", "s2", "p1", {"p1": 0.8, "p2": 0.2}, "gmm", 3, T0, False, 2)
    with pytest.raises(AlreadyExists) as err:
        fb.record_predictions([fresh, other])
    assert err.value.field == "predictions[1].prediction_id"
    assert fb.prediction("pr2") is None and fb.prediction("pr1") == p
    assert fb.record_predictions([fresh, p]) == (1, 1)


def test_privacy_consent_versions(database):
    privacy = ConsentStore(database)
    privacy.migrate()
    assert privacy.consent("acc-1").known is False
    assert privacy.set_consent("acc-1", False, True, "officer") == 1
    c = privacy.consent("acc-1")
    assert (c.processing, c.attribution, c.version, c.known) == (False, True, 1, True)


def test_privacy_withdrawn_consent_pages_in_id_order(database):
    """ListWithdrawnConsent's query on both SQL backends: accounts with a withdrawn purpose
    only, after the given id, in id order, and whether more follow."""
    privacy = ConsentStore(database)
    privacy.migrate()
    for account, processing, attribution in [("acc-3", True, False), ("acc-1", False, True), ("acc-2", True, True),
                                             ("acc-5", False, False), ("acc-4", True, True)]:
        privacy.set_consent(account, processing, attribution, "officer")
    privacy.set_consent("acc-4", True, False, "officer")   # withdrawn after giving it
    page, more = privacy.withdrawn("", 2)
    assert [(c.account_id, c.processing, c.attribution) for c in page] == [("acc-1", False, True),
                                                                           ("acc-3", True, False)] and more
    page, more = privacy.withdrawn("acc-3", 10)
    assert [c.account_id for c in page] == ["acc-4", "acc-5"] and not more


def test_feature_vectors_survive_storage_bit_exact(store):
    store.ingest([ev(i, T0 + i * 60, series_id="s1") for i in range(5)])
    stored = store.household("acc-1").sessions[0]
    from services.clustering.domain.sessions import build_sessions

    expected = build_sessions([ev(i, T0 + i * 60, series_id="s1") for i in range(5)])[0]
    assert np.array_equal(stored.features, expected.features)


def _count(database, table, account="acc-1"):
    with database.transaction() as tx:
        return tx.query(f"SELECT COUNT(*) FROM {table} WHERE account_id = ?", (account,))[0][0]


def test_erase_household_leaves_nothing_and_is_idempotent(store, database):
    from services.common.erasure import ErasureScope

    store.ingest([ev(i, T0 + i * 60) for i in range(5)] + [ev(9, T0, account="acc-2")])
    store.save_model("acc-1", 0, "gmm", b"m")
    store.add_drift_event("acc-1", DriftRow("sudden", 1, 1, T0, False))
    out = store.erase(ErasureScope("acc-1", "household"))
    assert out.deleted_counts == {"events": 5, "sessions": 1, "devices": 1, "household_models": 1,
                                  "drift_events": 1}
    for table in ("events", "sessions", "devices", "household_models", "drift_events"):
        assert _count(database, table) == 0, table
    assert store.get_model("acc-1") is None
    assert _count(database, "events", "acc-2") == 1          # other households untouched
    assert store.erase(ErasureScope("acc-1", "household")).empty


def test_erase_window_rebuilds_partly_covered_sessions(store, database):
    from services.common.erasure import ErasureScope

    store.ingest([ev(i, T0 + i * 600) for i in range(6)])     # one session, 6 events
    out = store.erase(ErasureScope("acc-1", "window", start=T0 + 2400, end=None))
    assert out.deleted_counts["events"] == 2
    (session,) = store.household("acc-1").sessions
    assert session.event_count == 4 and session.end_ts == T0 + 1800
    assert store.household("acc-1").devices[0].last_ts == T0 + 1800


def test_erase_person_removes_their_sessions_and_events(store, database):
    from services.common.erasure import ErasureScope

    store.ingest([ev(i, T0 + i * 60) for i in range(3)] + [ev(10 + i, T0 + 20_000 + i * 60) for i in range(2)])
    first, second = sorted(store.household("acc-1").sessions, key=lambda s: s.start_ts)
    store.set_persons("acc-1", {first.session_id: "p1", second.session_id: "p2"})
    out = store.erase(ErasureScope("acc-1", "person", person_id="p1"))
    assert out.deleted_counts == {"events": 3, "sessions": 1}
    remaining = store.household("acc-1").sessions
    assert [s.person_id for s in remaining] == ["p2"]
    assert _count(database, "events") == 2


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "sealed"])
def test_an_erased_event_sent_again_is_a_duplicate_and_erased_data_does_not_come_back(database, cache, keyed):
    """chaos23: a device, person or window erasure deleted the events, and the same events
    sent again (a client retrying a batch it had sent before the erasure, a replayed
    stream) were accepted as new: the erased device's or window's viewing was back in the
    store after the job had completed and its receipt said erased. Now the erasure keeps a
    keyed digest of each erased id (``erased_events``: no id, no time) and a replay is a
    duplicate; new events of the scope are stored as before. A household erasure and the
    retention purge drop the digests they no longer need."""
    from services.common.erasure import ErasureScope
    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.keys import ring_fetcher

    cipher = FieldCipher(ring_fetcher(KeyRing([generate_kek("k")], "k"), []), ttl_s=60) if keyed else None
    store = ClusteringStore(database, cache, gap_s=1800, lateness_tolerance_s=6 * 3600, cipher=cipher)
    store.migrate()
    a = "acc-replay"
    tv = [ev(i, T0 + i * 60, account=a) for i in range(4)]
    tablet = [ev(i, T0 + 30 + i * 60, device="tab-2", account=a) for i in range(4)]
    later = [ev(10 + i, T0 + 40_000 + i * 60, account=a) for i in range(3)]
    assert store.ingest(tv + tablet + later).accepted == 11

    def stored() -> set[str]:
        with database.transaction() as tx:
            return {r[0] for r in tx.query("SELECT event_id FROM events WHERE account_id = ?", (a,))}

    store.erase(ErasureScope(a, "device", device_id="tab-2"))
    replay = store.ingest(tv + tablet + later)                      # the whole batch again
    # tv's first events are older than its newest minus the tolerance, but stored: duplicates
    # (until session 36 counted rejected_late, "not stored"; tests/e2e/test_resend_counts_e2e.py)
    assert (replay.accepted, replay.duplicates, replay.rejected_late) == (0, 11, 0), replay
    assert stored() == {e.event_id for e in tv + later}
    # the device's new events are kept: recorded after its erasure (what it recorded before
    # is fenced off since session 31, tests/integration/test_erasure_in_flight.py)
    fresh = [ev(20, time.time(), device="tab-2", account=a)]
    assert store.ingest(fresh).accepted == 1
    first = min(store.household(a).sessions, key=lambda s: s.start_ts)
    store.set_persons(a, {s.session_id: ("p1" if s.session_id == first.session_id else "p2")
                          for s in store.household(a).sessions})
    store.erase(ErasureScope(a, "person", person_id="p1"))
    store.erase(ErasureScope(a, "window", start=T0 + 40_000, end=T0 + 40_000 + 90))
    left = stored()
    replay = store.ingest(tv + tablet + later + fresh)
    assert replay.accepted == 0 and stored() == left
    with database.transaction() as tx:
        rows = tx.query("SELECT digest FROM erased_events WHERE account_id = ?", (a,))
    assert len(rows) == 12 - len(left)                              # every erased one
    ids = {e.event_id.encode() for e in tv + tablet + later + fresh}
    assert not any(i in bytes(r[0]) for r in rows for i in ids)      # digests, never the ids
    store.erase(ErasureScope("*", "window", end=time.time() + 3600))  # the retention purge, later
    assert _count(database, "erased_events", a) == 0
    store.ingest([ev(30, T0, device="tab-3", account=a)])
    store.erase(ErasureScope(a, "device", device_id="tab-3"))
    assert _count(database, "erased_events", a) == 1
    store.erase(ErasureScope(a, "household"))
    assert _count(database, "erased_events", a) == 0


def test_erased_events_stay_duplicates_after_the_households_data_key_changes(database, cache):
    """review23's doubt, dek24: the digests of erased ids were keyed with the household's
    *newest* data key, so once a newer version existed (``KeyRing.create_dek`` makes one:
    latest + 1, new encryptions use it) a replay of an earlier erasure's events no longer
    matched its digests and was stored again (7 of 7 here). The digest key is now derived
    from the household's first data key (version 1), which lives as long as the household
    (only a household erasure destroys it, with every version). Events stored after the
    change are sealed under the new version; a household erasure still leaves no digest
    and no key to make one."""
    from services.common.erasure import ErasureScope
    from services.common.errors import FailedPrecondition
    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.keys import NOW, ring_fetcher

    ring = KeyRing([generate_kek("k")], "k")
    store = ClusteringStore(database, cache, gap_s=1800, lateness_tolerance_s=6 * 3600,
                            cipher=FieldCipher(ring_fetcher(ring, []), ttl_s=60))
    store.migrate()
    a = "acc-rekeyed"
    tv = [ev(i, T0 + i * 60, account=a) for i in range(3)]
    tablet = [ev(i, T0 + 30 + i * 60, device="tab-2", account=a) for i in range(4)]
    assert store.ingest(tv + tablet).accepted == 7
    store.erase(ErasureScope(a, "device", device_id="tab-2"))

    assert ring.create_dek(a, NOW).dek_version == 2              # the household's data key changes
    store.cipher.forget(a)                                       # as every replica does within the TTL
    assert store.cipher.encrypt(a, "title_id", b"x")[1:5] == (2).to_bytes(4, "big")
    replay = store.ingest(tv + tablet)                           # the whole batch again
    assert (replay.accepted, replay.duplicates) == (0, 7), replay
    with database.transaction() as tx:
        assert {r[0] for r in tx.query("SELECT event_id FROM events WHERE account_id = ?", (a,))} \
            == {e.event_id for e in tv}
    # An erasure after the change, and its replay: a duplicate too.
    assert store.ingest([ev(9, T0 + 400, device="tab-3", account=a)]).accepted == 1
    store.erase(ErasureScope(a, "device", device_id="tab-3"))
    assert store.ingest([ev(9, T0 + 400, device="tab-3", account=a)]).duplicates == 1
    assert _count(database, "erased_events", a) == 5

    store.erase(ErasureScope(a, "household"))
    ring.destroy_dek(a, NOW)
    store.cipher.forget(a)
    assert _count(database, "erased_events", a) == 0
    with pytest.raises(FailedPrecondition):                      # no version left to key a digest
        store.cipher.digests(a, ["anything"])


def test_erased_touchpoints_stay_duplicates_after_the_households_data_key_changes(database):
    """As the test above, for attribution's touchpoints and conversions (dek24)."""
    from services.common.erasure import ErasureScope
    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.keys import NOW, ring_fetcher

    ring = KeyRing([generate_kek("k")], "k")
    store = AttributionStore(database, cipher=FieldCipher(ring_fetcher(ring, []), ttl_s=60))
    store.migrate()
    a = "acc-rekeyed"
    tps = [Touchpoint(f"tp{i}", a, "tab-2" if i % 2 else "tv-1", T0 + i * 60, "search", campaign="c")
           for i in range(4)]
    conv = [Conversion("c-tab", a, T0 + 30, "subscribe", 9.99, "tab-2")]
    assert store.record_touchpoints(tps) == (4, 0) and store.record_conversions(conv) == (1, 0)
    store.erase(ErasureScope(a, "device", device_id="tab-2"))
    assert ring.create_dek(a, NOW).dek_version == 2
    store.cipher.forget(a)
    assert store.record_touchpoints(tps) == (0, 4)
    assert store.record_conversions(conv) == (0, 1)
    assert [t.touchpoint_id for t in store.load([a], None, None, 86400)[0]] == ["tp0", "tp2"]
    store.erase(ErasureScope(a, "household"))
    assert _count(database, "erased_records", a) == 0


def test_resolve_persons_picks_the_session_near_each_instant(store):
    store.ingest([ev(i, T0 + i * 60) for i in range(3)] + [ev(10 + i, T0 + 20_000 + i * 60) for i in range(2)])
    first, second = sorted(store.household("acc-1").sessions, key=lambda s: s.start_ts)
    store.set_persons("acc-1", {first.session_id: "p1", second.session_id: "p2"},
                      {first.session_id: {"p1": 0.9, "p2": 0.1}})
    resolved = store.resolve_persons([("acc-1", "tv-1", T0 + 30), ("acc-1", "tv-1", T0 + 20_000 - 600),
                                      ("acc-1", "tv-1", T0 + 10_000), ("acc-1", "nope", T0)])
    assert resolved[0] == (first.session_id, {"p1": 0.9, "p2": 0.1})
    assert resolved[1] == (second.session_id, {"p2": 1.0})       # 10 min before it: within one gap
    assert resolved[2] == ("", {}) and resolved[3] == ("", {})


def test_streamed_batches_extend_the_newest_session_as_the_full_rebuild_builds_it(database):
    """Session 22: a batch that appends to a device's newest session extends its kept
    (sealed) running state instead of re-reading the session's events. On both backends,
    random streams in small batches — mostly in time order, some events late (inside a
    session, before it, bridging two), ids repeated, persons named, windows and persons
    erased between — leave exactly build_sessions' sessions of the stored events, the
    newest of each device carrying the running state of its events (opened with the
    household's key); a household erasure leaves no session row, so no state. Since
    session 23 the events of seeds 1 and 2 carry UTC offsets (migration 11's column)."""
    import random

    from services.common.erasure import ErasureScope
    from services.common.field_crypto import FieldCipher
    from services.privacy.keys.domain import KeyRing, generate_kek
    from tests.helpers.incremental_sessions import assert_sessions_of_stored_events, random_event
    from tests.helpers.keys import ring_fetcher

    store = ClusteringStore(database, gap_s=1800, cipher=FieldCipher(ring_fetcher(KeyRing([generate_kek("k1")], "k1"),
                                                                                  [])))
    store.migrate()
    for seed in range(3):
        rng, account = random.Random(seed), f"acc-inc-{seed}"
        # Seeds 1 and 2 carry UTC offsets (session 23), mixed within sessions (the
        # session keeps its first event's): stored sealed, read back by the rebuild.
        events = [random_event(rng, account, i, T0 + 600.0 * rng.randint(0, 30) + rng.choice((0.0, 0.5)),
                               device=rng.choice(("tv-1", "ph-1")),
                               utc_offset_minutes=(None, 60, -300)[i % 3] if seed else None) for i in range(50)]
        events.sort(key=lambda e: (e.ts, e.event_id))
        for _ in range(4):   # some arrive late
            events.insert(rng.randrange(len(events)), events.pop(rng.randrange(len(events))))
        n = 0
        while events:
            batch = events[:rng.randint(1, 4)]
            events = events[len(batch):]
            store.ingest(batch + ([batch[0]] if rng.random() < 0.1 else []))   # a repeated id now and then
            n += 1
            if n in (3, 8):
                store.set_persons(account, {s.session_id: f"p{n}" for s in store.household(account).sessions})
            elif n == 10 and seed == 0:   # (an erasure purges physically: seconds on PostgreSQL)
                lo = T0 + 600.0 * rng.randint(0, 30)
                store.erase(ErasureScope(account, "window", start=lo, end=lo + 1200.0))
            elif n == 10 and seed == 1:
                store.erase(ErasureScope(account, "person", person_id="p8"))
            assert_sessions_of_stored_events(store, account)
    # (acc-inc-0: seed 1's person erasure took every session, and since session 31 fences
    # off what its devices recorded before it — the rest of its stream — so it has none.)
    with database.transaction() as tx:
        kept = tx.query("SELECT COUNT(*) FROM sessions WHERE account_id = ? AND state IS NOT NULL", ("acc-inc-0",))
        assert kept[0][0] >= 1
    store.erase(ErasureScope("acc-inc-0", "household"))
    with database.transaction() as tx:
        assert tx.query("SELECT COUNT(*) FROM sessions WHERE account_id = ?", ("acc-inc-0",)) == [(0,)]
        assert tx.query("SELECT COUNT(*) FROM sessions WHERE account_id = ? AND state IS NOT NULL",
                        ("acc-inc-2",))[0][0] >= 1


def test_the_closed_tail_is_the_closed_sessions_from_each_position(database):
    """ModelKeeper's arrivals-only refresh reads ClusteringStore.closed_tail: on both
    backends it is closed_sessions()[start:] for every start (the count, the first id,
    the id just before), with sessions sharing a start instant (the id orders them),
    closing exactly one gap after their end or just after, by the clock and by a
    device's watermark, and a session whose device row is gone (a watermark of 0)."""
    import random
    import uuid

    account = f"acc-tail-{uuid.uuid4().hex[:8]}"
    t0 = 1_767_225_600.0   # 2026-01-01T00:00:00Z
    store = ClusteringStore(database, gap_s=1800, lateness_tolerance_s=1e9)
    store.migrate()
    rng = random.Random(4)
    store.ingest([ev(i, t0 + 600.0 * rng.randint(0, 40), device=rng.choice(("tv-1", "ph-1", "tb-1")),
                     account=account) for i in range(40)])
    with database.transaction() as tx:
        tx.execute("DELETE FROM devices WHERE account_id = ? AND device_id = ?", (account, "tb-1"))
        last_end = float(tx.query("SELECT MAX(end_ts) FROM sessions WHERE account_id = ?", (account,))[0][0])
    fields = lambda s: (s.session_id, s.device_id, s.start_ts, s.end_ts, s.features.tobytes(), s.closed)  # noqa: E731
    for now in (last_end, last_end + 1800.0, last_end + 1800.5, last_end + 86400.0):
        full = store.closed_sessions(account, now=now)
        for start in range(len(full) + 2):
            tail = store.closed_tail(account, start, now=now)
            assert (tail.count, tail.first_id) == (len(full), full[0].session_id if full else "")
            assert tail.before_id == (full[start - 1].session_id if 0 < start <= len(full) else "")
            assert [fields(s) for s in tail.sessions] == [fields(s) for s in full[start:]]
    assert 0 < len(store.closed_sessions(account, now=last_end)) < len(store.closed_sessions(account, now=last_end + 86400))
