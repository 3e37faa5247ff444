"""The bound on distinct devices per household at ingest (HEARTH_MAX_DEVICES_PER_HOUSEHOLD)
and the household page's device list (attack25, docs/security.md): a batch that would
take a household past the bound is refused whole, naming the first event of the first
device past it; the household read lists the devices of its page's sessions. On SQLite
and on a real PostgreSQL (the ``database`` fixture)."""

from __future__ import annotations

import pytest

from services.clustering.domain.events import ViewingEvent
from services.clustering.settings import ClusteringSettings
from services.clustering.store import ClusteringStore
from services.common.errors import InvalidArgument

T0 = 1_767_225_600.0
HOUR = 3600.0


def _event(account: str, device: str, n: int) -> ViewingEvent:
    return ViewingEvent(event_id=f"{account}-{device}-{n}", account_id=account, device_id=device,
                        device_type="mobile", ts=T0 + n * HOUR, kind="heartbeat", duration_s=300.0)


@pytest.fixture
def store(database):
    s = ClusteringStore(database, max_devices_per_household=3)
    s.migrate()
    return s


def _event_count(store: ClusteringStore, account: str) -> int:
    with store.db.transaction(readonly=True) as tx:
        return tx.query("SELECT COUNT(*) FROM events WHERE account_id = ?", (account,))[0][0]


def test_a_batch_past_the_bound_is_refused_whole_naming_the_first_event_past_it(store):
    batch = [_event("a", "d1", 0), _event("a", "d2", 1), _event("a", "d1", 2), _event("a", "d3", 3),
             _event("b", "d1", 4), _event("a", "d4", 5), _event("a", "d5", 6)]
    with pytest.raises(InvalidArgument) as refused:
        store.ingest(batch)
    assert refused.value.field == "events[5].device_id"
    assert _event_count(store, "a") == 0 and _event_count(store, "b") == 0  # nothing of the batch


def test_known_devices_stay_welcome_at_the_bound_and_a_new_one_is_refused(store):
    assert store.ingest([_event("a", d, n) for n, d in enumerate(("d1", "d2", "d3"))]).accepted == 3
    assert store.ingest([_event("a", "d2", 10), _event("a", "d3", 11)]).accepted == 2
    with pytest.raises(InvalidArgument) as refused:
        store.ingest([_event("a", "d1", 12), _event("a", "d9", 13)])
    assert refused.value.field == "events[1].device_id"
    assert _event_count(store, "a") == 5
    # Another household has a bound of its own.
    assert store.ingest([_event("b", d, n) for n, d in enumerate(("d7", "d8", "d9"))]).accepted == 3


def test_the_bound_is_a_validated_setting():
    assert ClusteringSettings().max_devices_per_household == 1000
    with pytest.raises(ValueError, match="must be >= 1"):
        ClusteringSettings(max_devices_per_household=0)


def test_the_household_page_lists_the_devices_of_its_sessions(database):
    store = ClusteringStore(database)
    store.migrate()
    # d0 watches twice (sessions 0 and 5 hours in), d1..d4 once each.
    store.ingest([_event("a", f"d{n % 5}", n) for n in range(6)])
    page = store.household("a", max_sessions=2)
    assert [s.device_id for s in page.sessions] == ["d0", "d4"]
    assert {d.device_id: d.session_count for d in page.devices} == {"d0": 2, "d4": 1}
    assert page.total_devices == 5 and page.total_sessions == 6
    rest = store.household("a", max_sessions=10, cursor=page.next_cursor)
    assert sorted(d.device_id for d in rest.devices) == ["d0", "d1", "d2", "d3"]
