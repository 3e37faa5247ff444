"""Event, touchpoint and conversion ids are the sender's, unique only within a household
(on SQLite and PostgreSQL): another household reusing an id is stored, not reported as a
duplicate; a duplicate changes nothing, not even its device's watermark; and databases
created under the old global keys migrate with their rows intact."""

from __future__ import annotations

import time

from services.attribution.domain.records import Conversion, Touchpoint
from services.attribution.migrations import MIGRATIONS as ATTRIBUTION_MIGRATIONS
from services.attribution.store import AttributionStore
from services.clustering.domain.events import ViewingEvent
from services.clustering.migrations import MIGRATIONS as CLUSTERING_MIGRATIONS
from services.clustering.store import ClusteringStore
from services.common.storage.cache import MemoryCache
from services.common.storage.sql import migrate, schema_version

T0 = time.time() - 2 * 86400


def ev(event_id: str, account: str, ts: float, device: str = "tv-1") -> ViewingEvent:
    return ViewingEvent(event_id=event_id, account_id=account, device_id=device, device_type="tv", ts=ts,
                        kind="heartbeat", title_id="t-1", genres=("drama",), duration_s=60.0)


def clustering_store(database) -> ClusteringStore:
    store = ClusteringStore(database, MemoryCache(f"ids{time.monotonic_ns()}"), gap_s=1800,
                            lateness_tolerance_s=6 * 3600)
    store.migrate()
    return store


def test_another_household_reusing_an_event_id_is_stored_not_a_duplicate(database):
    store = clustering_store(database)
    assert store.ingest([ev("e-1", "acc-a", T0), ev("e-2", "acc-a", T0 + 60)]).accepted == 2
    other = store.ingest([ev("e-1", "acc-b", T0 + 5), ev("e-2", "acc-b", T0 + 65)])
    assert (other.accepted, other.duplicates) == (2, 0)
    assert sum(s.event_count for s in store.household("acc-b").sessions) == 2
    # Within one household the id still deduplicates, in the store and within a batch.
    again = store.ingest([ev("e-1", "acc-a", T0), ev("e-3", "acc-a", T0 + 120), ev("e-3", "acc-a", T0 + 121)])
    assert (again.accepted, again.duplicates) == (1, 2)
    assert sum(s.event_count for s in store.household("acc-a").sessions) == 3


def test_a_duplicate_carrying_a_later_time_changes_nothing(database):
    store = clustering_store(database)
    store.ingest([ev(f"e-{i}", "acc-a", T0 + i * 60) for i in range(3)])
    before = store.household("acc-a")
    # The same id again, now claiming to be 20 hours later: a duplicate, so it must not
    # move the device's watermark (which would make the next real events "late").
    dup = store.ingest([ev("e-2", "acc-a", T0 + 20 * 3600)])
    assert (dup.accepted, dup.duplicates, dup.rejected_late) == (0, 1, 0)
    after = store.household("acc-a")
    assert [d.last_ts for d in after.devices] == [d.last_ts for d in before.devices]
    following = store.ingest([ev(f"e-{i}", "acc-a", T0 + i * 60) for i in range(3, 13)])
    assert (following.accepted, following.rejected_late) == (10, 0)


def test_touchpoint_and_conversion_ids_are_scoped_per_household(database):
    store = AttributionStore(database)
    store.migrate()
    assert store.record_touchpoints([Touchpoint("tp-1", "acc-a", "tv-1", T0, "search")]) == (1, 0)
    assert store.record_touchpoints([Touchpoint("tp-1", "acc-b", "tv-9", T0 + 1, "email")]) == (1, 0)
    assert store.record_touchpoints([Touchpoint("tp-1", "acc-a", "tv-1", T0, "search")]) == (0, 1)
    assert store.record_conversions([Conversion("c-1", "acc-a", T0 + 10, "subscribe", 9.99)]) == (1, 0)
    assert store.record_conversions([Conversion("c-1", "acc-b", T0 + 10, "subscribe", 5.0)]) == (1, 0)
    tps, convs = store.load(["acc-b"], None, None, 86400)
    assert [(t.touchpoint_id, t.channel) for t in tps] == [("tp-1", "email")]
    assert [(c.conversion_id, c.value) for c in convs] == [("c-1", 5.0)]


def test_old_global_event_keys_migrate_with_their_rows(database):
    # A database as the previous release left it: migrations up to the global keys.
    migrate(database, CLUSTERING_MIGRATIONS[:4])
    with database.transaction() as tx:
        tx.execute("INSERT INTO events (event_id, account_id, device_id, device_type, ts, kind, title_id, "
                   "genres, duration_s, vpn) VALUES ('e-1', 'acc-a', 'tv-1', 'tv', ?, 'heartbeat', 't', "
                   "'[]', 60, 0)", (T0,))
    store = clustering_store(database)  # applies the rest
    assert schema_version(database) == CLUSTERING_MIGRATIONS[-1].version
    with database.transaction() as tx:
        assert tx.query("SELECT event_id, account_id FROM events") == [("e-1", "acc-a")]
    assert store.ingest([ev("e-1", "acc-b", T0)]).accepted == 1
    assert store.ingest([ev("e-1", "acc-a", T0)]).duplicates == 1


def test_old_global_touchpoint_keys_migrate_with_their_rows(database):
    migrate(database, ATTRIBUTION_MIGRATIONS[:1])
    with database.transaction() as tx:
        tx.execute("INSERT INTO touchpoints (touchpoint_id, account_id, device_id, ts, channel, campaign) "
                   "VALUES ('tp-1', 'acc-a', 'tv-1', ?, 'search', '')", (T0,))
        tx.execute("INSERT INTO conversions (conversion_id, account_id, ts, kind, value) "
                   "VALUES ('c-1', 'acc-a', ?, 'subscribe', 1.5)", (T0,))
    store = AttributionStore(database)
    store.migrate()
    assert schema_version(database) == ATTRIBUTION_MIGRATIONS[-1].version
    tps, convs = store.load(["acc-a"], None, None, 86400)
    assert [t.touchpoint_id for t in tps] == ["tp-1"] and [c.value for c in convs] == [1.5]
    assert store.record_touchpoints([Touchpoint("tp-1", "acc-b", "tv-1", T0, "search")]) == (1, 0)
    assert store.record_conversions([Conversion("c-1", "acc-b", T0, "subscribe", 2.0)]) == (1, 0)
