"""A clustering ingest whose caller's deadline passed stops inside its write transaction,
rolled back whole (keys28): with a new household's key and consent now fetched in batches, a
request of thousands of new households reaches its write sooner, and one still too big for
the gateway's deadline held the store's write lock (SQLite: every other write of the
service waits) for the rest of its households after its caller had its 504."""

from __future__ import annotations

import time

import pytest

from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore
from services.common.client import reset_serving_deadline, set_serving_deadline
from services.common.errors import DeadlineExceeded


def _events(n: int) -> list[ViewingEvent]:
    ts = time.time() - 3600
    return [ViewingEvent(f"e{i}", f"acct-{i}", "tv-1", "tv", ts, "heartbeat", "title-1", None, ("drama",), 300.0)
            for i in range(n)]


def test_an_ingest_past_its_callers_deadline_stores_nothing(database):
    store = ClusteringStore(database)
    store.migrate()
    token = set_serving_deadline(-1.0)     # the caller's deadline has passed
    try:
        with pytest.raises(DeadlineExceeded):
            store.ingest(_events(20))
    finally:
        reset_serving_deadline(token)
    with database.transaction(readonly=True) as tx:
        assert tx.query("SELECT COUNT(*) FROM events")[0][0] == 0
        assert tx.query("SELECT COUNT(*) FROM devices")[0][0] == 0
    assert store.ingest(_events(20)).accepted == 20   # outside a call: no deadline
