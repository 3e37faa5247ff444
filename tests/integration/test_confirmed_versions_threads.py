"""The model versions a clustering store noted as confirmed by the database (d554c16,
a61d6ce: ``ClusteringStore._note_confirmed``, which also drops the notes past
MODEL_CONFIRM_S) are written by every RPC thread that reads a model. Two threads dropping
the same oldest note at once raised KeyError or "OrderedDict mutated during iteration"
out of ``get_model`` — an INTERNAL answer (review29). The notes' expiry is made short
here so that every call drops some, as a busy replica's do once a minute."""

from __future__ import annotations

import sys
import threading

import services.clustering.store as clustering_store
from services.clustering.store import ClusteringStore
from services.common.storage.sql import SqliteDatabase


def test_threads_noting_and_dropping_confirmed_versions_at_once_raise_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(clustering_store, "MODEL_CONFIRM_S", 0.0005)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # threads switch often, as on a loaded replica
    store = ClusteringStore(SqliteDatabase(tmp_path / "clustering.db"), gap_s=1800)
    errors: list[str] = []

    def reads(thread: int) -> None:
        try:
            for i in range(20000):
                store._note_confirmed(f"acc-{thread}-{i % 50}", 1)
        except Exception as exc:  # noqa: BLE001 - what an RPC thread would have raised
            errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=reads, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        store.db.close()
    assert errors == []
