"""A batch in flight during a device, person or window erasure (attack30's "Left", session
31): a batch of the erased scope received before the erasure whose write transaction commits
after it was stored — its events were not in the store when the erasure ran, so no digest of
theirs was kept (``erased_events``) and the erased device's viewing was back once the job had
completed. Now a device, person or window erasure leaves a fence (``erasure_fences``): what the
scope recorded up to the erasure and the store does not hold yet is refused whenever it
arrives; what a device records after it is new data (docs/privacy.md, "An erased scope stays
erased"). Real SQLite and PostgreSQL; the race through two threads on the store."""

from __future__ import annotations

import threading
import time

import pytest

from services.clustering.store import ClusteringStore
from services.common.erasure import ErasureScope
from services.common.field_crypto import FieldCipher
from services.common.storage.cache import MemoryCache
from services.privacy.keys.domain import KeyRing, generate_kek
from tests.helpers.held_transaction import transaction_held_open
from tests.helpers.keys import ring_fetcher
from tests.integration.test_storage import ev

T0 = time.time() - 3 * 86400


def _store(database) -> ClusteringStore:
    cipher = FieldCipher(ring_fetcher(KeyRing([generate_kek("k")], "k"), []), ttl_s=60)
    store = ClusteringStore(database, MemoryCache(f"inflight{time.monotonic_ns()}"), gap_s=1800, lateness_tolerance_s=6 * 3600, cipher=cipher)
    store.migrate()
    return store


def _device_events(database, account: str, device: str) -> set[str]:
    with database.transaction() as tx:
        return {r[0] for r in tx.query("SELECT event_id FROM events WHERE account_id = ? AND device_id = ?",
                                       (account, device))}


def _waiting_on_a_lock(database, account: str, waiters: int) -> None:
    """Until ``waiters`` transactions wait for the household's lock (PostgreSQL); SQLite's
    writers poll for the write lock, which cannot be seen from outside: a pause."""
    if database.dialect != "postgres":
        time.sleep(0.3)
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with database.transaction(readonly=True) as tx:
            key = int(tx.query("SELECT hashtextextended(?, 0)", (f"{database.schema}:household:{account}",))[0][0])
            if tx.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                        "AND classid::bigint = ? AND objid::bigint = ?",
                        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF))[0][0] >= waiters:
                return
        time.sleep(0.02)
    raise AssertionError(f"{waiters} transactions did not queue for the household's lock within 10 s")


def test_a_batch_in_flight_during_a_device_erasure_does_not_survive_it(database):
    """The race itself: the erasure and a batch of the tablet it erases, both waiting for the
    household (a third writer holds it), the erasure first in the queue (PostgreSQL grants an
    advisory lock in queue order; SQLite's order is the busy handler's). Before: the batch
    committed after the erasure and the tablet held its 5 events after the job."""
    store = _store(database)
    a = "acc-inflight"
    tv = [ev(i, T0 + i * 60, account=a) for i in range(3)]
    tablet = [ev(i, T0 + 30 + i * 60, device="tab-2", account=a) for i in range(3)]
    store.ingest(tv + tablet)
    in_flight = [ev(10 + i, T0 + 400 + i * 60, device="tab-2", account=a) for i in range(5)]
    done: dict[str, object] = {}
    threads = [threading.Thread(target=lambda: done.setdefault("erase", store.erase(
                   ErasureScope(a, "device", device_id="tab-2")))),
               threading.Thread(target=lambda: done.setdefault("ingest", store.ingest(in_flight)))]
    with transaction_held_open(database, lambda tx: tx.lock_household(a)):
        for waiting, thread in enumerate(threads, start=1):
            thread.start()
            _waiting_on_a_lock(database, a, waiting)
    for thread in threads:
        thread.join(30)
    assert set(done) == {"erase", "ingest"}
    assert _device_events(database, a, "tab-2") == set(), done["ingest"]
    assert _device_events(database, a, "tv-1") == {e.event_id for e in tv}


@pytest.mark.parametrize("scope", ["device", "person", "window"])
def test_what_an_erased_scope_recorded_before_its_erasure_is_refused_whenever_it_arrives(database, scope):
    """The order the race above ends in when the batch commits second, for every scope:
    events the erased scope recorded before the erasure, with ids the store never held (a
    batch in flight, a retry of one that failed, a device's backlog sent later), are not
    stored; the scope's events recorded after the erasure are (an erasure is not a ban), and
    other devices' and other times' events are untouched."""
    store = _store(database)
    a = f"acc-fenced-{scope}"
    tv = [ev(i, T0 + i * 60, account=a) for i in range(3)]
    tablet = [ev(i, T0 + 30 + i * 60, device="tab-2", account=a) for i in range(3)]
    store.ingest(tv + tablet)
    if scope == "person":
        store.set_persons(a, {s.session_id: ("p2" if s.device_id == "tab-2" else "p1")
                              for s in store.household(a).sessions})
        erasure = ErasureScope(a, "person", person_id="p2")
    elif scope == "window":
        erasure = ErasureScope(a, "window", start=T0 + 20, end=T0 + 1000)
    else:
        erasure = ErasureScope(a, "device", device_id="tab-2")
    store.erase(erasure)
    assert _device_events(database, a, "tab-2") == set()
    in_flight = [ev(10 + i, T0 + 400 + i * 60, device="tab-2", account=a) for i in range(5)]
    result = store.ingest(in_flight)
    assert (result.accepted, result.duplicates) == (0, 5), result
    assert _device_events(database, a, "tab-2") == set()
    after = [ev(20 + i, time.time() + i, device="tab-2", account=a) for i in range(2)]
    assert store.ingest(after).accepted == 2                   # recorded after the erasure: kept
    other = [ev(30, T0 + 2000, device="phone-3", account=a)]    # outside the window, another device
    assert store.ingest(other).accepted == 1


@pytest.mark.parametrize("kind", ["household", "device", "person"])
def test_a_prediction_logged_within_the_fence_wait_does_not_outlive_the_erasure(database, kind):
    """Session 30's fence: once clustering's Erase has moved the fence it waits
    HEARTH_ERASURE_FENCE_S before it answers, and meanwhile another replica that has not
    read the fence yet answers from the model it holds — and logs that answer to the
    shared outbox (here: the replica's prediction log writing beside the erasing one's).
    The erasure's pass over the outbox had run before, so the prediction stayed and was
    forwarded to feedback after the job (feedback erases what it holds when its turn
    comes, right after clustering's; a prediction still in the outbox then — feedback
    slow or down, a backlog — arrived later and stayed). Now the Erase takes the scope's
    pending predictions once more after its wait."""
    from services.clustering.app import ClusteringApp
    from services.clustering.modeling import ModelKeeper
    from services.clustering.prediction_log import PredictionLog
    from services.common.predictions import PredictionRecord

    store = _store(database)
    a = f"acc-wait-{kind}"
    store.ingest([ev(i, T0 + i * 4000, account=a) for i in range(3)]
                 + [ev(i, T0 + 30 + i * 4000, device="tab-2", account=a) for i in range(3)])
    store.set_persons(a, {s.session_id: ("p2" if s.device_id == "tab-2" else "p1")
                          for s in store.household(a).sessions})
    sent: list = []
    erasing_log, other_replicas_log = (PredictionLog(database, sent.append, forward_interval_s=3600)
                                       for _ in range(2))
    app = ClusteringApp(store, keeper=ModelKeeper(store, lambda _a: "gmm"), predictions=erasing_log,
                        background=False, erasure_fence_s=1.0)
    scope = {"household": ErasureScope(a, "household"), "device": ErasureScope(a, "device", device_id="tab-2"),
             "person": ErasureScope(a, "person", person_id="p2")}[kind]
    epoch = store.erasure_fence_epoch
    answered = threading.Event()

    def another_replica_answers_within_the_wait() -> None:
        deadline = time.monotonic() + 20
        while store.erasure_fence_epoch == epoch and time.monotonic() < deadline:
            time.sleep(0.01)
        # A bare vector's answer on the tablet (no session id), naming the tablet's person.
        other_replicas_log.record([PredictionRecord("pr-within-the-wait", a, "", "p2", {"p1": 0.2, "p2": 0.8},
                                                    "gmm", 1, time.time(), False, 2, "tab-2")])
        answered.set()

    thread = threading.Thread(target=another_replica_answers_within_the_wait)
    thread.start()
    try:
        outcome = app.erase(scope)
    finally:
        thread.join(30)
        app.close()
    assert answered.is_set()
    while erasing_log.forward_once():
        pass
    forwarded = [p.prediction_id for request in sent for p in request.predictions]
    other_replicas_log.close()
    erasing_log.close()
    assert "pr-within-the-wait" not in forwarded
    assert "pr-within-the-wait" in outcome.deleted_ids_of("pending_predictions")


def test_a_fence_holds_on_the_path_of_a_big_batch_of_known_devices(database):
    """A batch of PREPARE_KNOWN_DEVICES_FROM known devices or more is written set-wise
    (ingest31, ``_write_prepared_devices``), past the per-device loop that checks fences: a
    household fenced by a window erasure that deleted nothing (so no digest marks it) must
    still go the per-device way."""
    from services.clustering.store import PREPARE_KNOWN_DEVICES_FROM

    store = _store(database)
    accounts = [f"acc-big-{i}" for i in range(PREPARE_KNOWN_DEVICES_FROM)]
    store.ingest([ev(0, T0, account=a) for a in accounts])
    fenced = accounts[0]
    store.erase(ErasureScope(fenced, "window", start=T0 + 1000, end=T0 + 2000))   # deletes nothing
    result = store.ingest([ev(1, T0 + 1500, account=a) for a in accounts])
    assert (result.accepted, result.duplicates) == (len(accounts) - 1, 1), result
    assert _device_events(database, fenced, "tv-1") == {f"{fenced}-tv-1-e0"}


@pytest.mark.parametrize("scope", ["device", "window"])
def test_attributions_records_of_an_erased_scope_recorded_before_it_are_refused_whenever_they_arrive(database, scope):
    """The same gap in attribution: touchpoints and conversions of the erased device or
    window with new ids, sent after the erasure (in flight during it, a backlog), were
    stored. Now attribution's erasure leaves the same fence; what is recorded after it is
    stored."""
    from services.attribution.domain.records import Conversion, Touchpoint
    from services.attribution.store import AttributionStore

    cipher = FieldCipher(ring_fetcher(KeyRing([generate_kek("k")], "k"), []), ttl_s=60)
    store = AttributionStore(database, cipher=cipher)
    store.migrate()
    a = f"acc-attr-{scope}"

    def tp(i: int, device: str, ts: float) -> Touchpoint:
        return Touchpoint(f"tp-{i}", a, device, ts, "email", "spring")

    def cv(i: int, device: str, ts: float) -> Conversion:
        return Conversion(f"cv-{i}", a, ts, "purchase", 10.0, device)

    store.record_touchpoints([tp(0, "tv-1", T0), tp(1, "tab-2", T0 + 30)])
    store.record_conversions([cv(0, "tab-2", T0 + 40)])
    store.erase(ErasureScope(a, "device", device_id="tab-2") if scope == "device"
                else ErasureScope(a, "window", start=T0 + 20, end=T0 + 1000))
    assert store.record_touchpoints([tp(2, "tab-2", T0 + 400)]) == (0, 1)
    assert store.record_conversions([cv(1, "tab-2", T0 + 500)]) == (0, 1)
    now = time.time()
    assert store.record_touchpoints([tp(3, "tab-2", now), tp(4, "tv-1", T0 + 2000)]) == (2, 0)
    assert store.record_conversions([cv(2, "tab-2", now)]) == (1, 0)


def test_attributions_person_erasure_refuses_the_persons_records_recorded_before_it(database):
    """Attribution's person erasure left no fence (session 31's "Left"): a touchpoint of the
    erased person recorded before the erasure and sent after it — on a device the person's
    erased touchpoints were on (a person is latent: it carries none), or naming the person —
    was stored. Now it leaves clustering's fences (the same rule): those are refused; what is
    recorded after the erasure is stored, one naming another person is (it is not the erased
    person's: only an unnamed one may be), and conversions (the account's, which a person
    erasure keeps) are not refused."""
    from services.attribution.domain.records import Conversion, Touchpoint
    from services.attribution.store import AttributionStore

    cipher = FieldCipher(ring_fetcher(KeyRing([generate_kek("k")], "k"), []), ttl_s=60)
    store = AttributionStore(database, cipher=cipher)
    store.migrate()
    a = "acc-attr-person"

    def tp(i: int, device: str, ts: float, person: str | None = None) -> Touchpoint:
        return Touchpoint(f"tp-{i}", a, device, ts, "email", "spring", person)

    store.record_touchpoints([tp(0, "tv-1", T0), tp(1, "tab-2", T0 + 30), tp(2, "tab-2", T0 + 60, "p2")])
    # tp-1 is the one clustering resolved to p2 (AttributionApp.erase); tp-2 names p2.
    store.erase(ErasureScope(a, "person", person_id="p2"), ["tp-1"])
    assert store.record_touchpoints([tp(3, "tab-2", T0 + 400)]) == (0, 1)            # the person's device
    assert store.record_touchpoints([tp(9, "tab-2", T0 + 450, "p1")]) == (1, 0)      # there, naming another
    assert store.record_touchpoints([tp(4, "phone-3", T0 + 500, "p2")]) == (0, 1)    # naming the person
    now = time.time()
    assert store.record_touchpoints([tp(5, "tab-2", now), tp(6, "phone-3", now, "p2"),
                                     tp(7, "tv-1", T0 + 700), tp(8, "phone-3", T0 + 800, "p1")]) == (4, 0)
    assert store.record_conversions([Conversion("cv-0", a, T0 + 900, "purchase", 10.0, "tab-2")]) == (1, 0)


def test_attributions_person_erasure_fences_the_devices_of_its_touchpoints_and_its_own_not_other_shared_ones(database):
    """The person erasure's device set (session 33, review33 R8: privacy first): every
    device one of the person's erased touchpoints was on, shared or not (the TV here: an
    unnamed touchpoint there may be the person's), and the person's own devices as
    clustering reads them (the phone here: it sent nothing before). Another shared device
    the person left no erased touchpoint on (the console) is not fenced: nothing ties an
    unnamed touchpoint there to the person, and a fence would refuse the other members'."""
    from services.attribution.domain.records import Touchpoint
    from services.attribution.store import AttributionStore

    store = AttributionStore(database, cipher=FieldCipher(ring_fetcher(KeyRing([generate_kek("k")], "k"), []),
                                                          ttl_s=60))
    store.migrate()
    a = "acc-attr-person-devices"

    def tp(i: int, device: str, ts: float) -> Touchpoint:
        return Touchpoint(f"tp-{i}", a, device, ts, "email", "spring")

    store.record_touchpoints([tp(0, "tv-1", T0), tp(1, "console-1", T0 + 30)])
    # tp-0 is the one clustering resolved to p2 (AttributionApp.erase); tv-1 and console-1
    # are shared in clustering's reading, phone-2 is p2's own.
    store.erase(ErasureScope(a, "person", person_id="p2"), ["tp-0"], own_devices=["phone-2"])
    assert store.record_touchpoints([tp(2, "tv-1", T0 + 400)]) == (0, 1)         # its erased touchpoint's
    assert store.record_touchpoints([tp(3, "phone-2", T0 + 400)]) == (0, 1)      # its own
    assert store.record_touchpoints([tp(4, "console-1", T0 + 400)]) == (1, 0)    # shared, no evidence


def _fence_rows(database) -> list[tuple]:
    with database.transaction(readonly=True) as tx:
        return sorted((r[0], r[1] is None, r[2], float(r[3])) for r in tx.query(
            "SELECT account_id, device_digest, lo, hi FROM erasure_fences"))


@pytest.mark.parametrize("service", ["clustering", "attribution"])
def test_a_fence_another_covers_is_not_kept_and_the_retention_purge_drops_expired_ones(database, service):
    """A fence's lifetime (session 31's "Left": rows accumulated until a household erasure or
    the retention purge). A device (person) erased again — or a deletion job's retried Erase —
    wrote a row each time, and a window inside an erased one another: now a fence another
    covers is not kept (one row per subject and window). The retention purge drops a fence
    whose span ended before its window: what it covers is refused as expired at ingest."""
    a = f"acc-fence-life-{service}"
    if service == "clustering":
        store = _store(database)
        store.ingest([ev(i, T0 + i * 60, account=a) for i in range(3)]
                     + [ev(10 + i, T0 + 30 + i * 60, device="tab-2", account=a) for i in range(3)])
    else:
        from services.attribution.domain.records import Touchpoint
        from services.attribution.store import AttributionStore

        store = AttributionStore(database, cipher=FieldCipher(ring_fetcher(KeyRing([generate_kek("k")], "k"), []),
                                                              ttl_s=60))
        store.migrate()
        store.record_touchpoints([Touchpoint(f"tp-{i}", a, d, T0 + i * 60, "email")
                                  for i, d in enumerate(["tv-1", "tab-2", "tv-1"])])
    for _ in range(3):
        store.erase(ErasureScope(a, "device", device_id="tab-2"))
    store.erase(ErasureScope(a, "window", start=T0 + 20, end=T0 + 1000))
    store.erase(ErasureScope(a, "window", start=T0, end=T0 + 2000))      # covers the one before
    store.erase(ErasureScope(a, "window", start=T0 + 100, end=T0 + 200))  # inside it
    rows = _fence_rows(database)
    assert [(r[1], r[2], r[3]) for r in rows if r[1]] == [(True, T0, T0 + 2000)], rows   # one window
    assert len([r for r in rows if not r[1]]) == 1, rows                                  # one device
    store.erase(ErasureScope("*", "window", end=T0 + 2000 + 3600))   # the retention purge, past the window
    assert [r[1] for r in _fence_rows(database)] == [False]           # the device's fence stays
