"""How long one ingest batch of N households with a cold key cache holds clustering's
write lock, when each key fetch (privacy's GetDataKey) costs a round trip: the keys
fetched inside the write transaction (as until session 27, the baseline of the same run)
and before it (``field_crypto.fetch_keys_before_writing``).

    python -m bench.write_lock_keys [--households 1000] [--rtt-ms 2]

A ``ClusteringStore`` on SQLite in a temporary directory, a real key ring behind a fetcher
that sleeps ``--rtt-ms`` per call (the round trip). Prints one JSON object: per mode, the
call's wall time and how long its write transaction held the lock (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import services.clustering.store as clustering_store
from bench.ingest_cpu import _fetcher
from services.clustering.domain.events import ViewingEvent
from services.common.field_crypto import FieldCipher
from services.common.storage.sql import SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek


class _Timed:
    """The database, timing its write transactions."""

    def __init__(self, db, held: list[float]) -> None:
        self._db, self._held = db, held

    def __getattr__(self, name):
        return getattr(self._db, name)

    @contextlib.contextmanager
    def transaction(self, readonly: bool = False):
        started = time.perf_counter()
        with self._db.transaction(readonly) as tx:
            yield tx
        if not readonly:
            self._held.append(time.perf_counter() - started)


def run(households: int, rtt_s: float, keys_first: bool) -> dict:
    fetch = _fetcher(KeyRing([generate_kek("k")], "k"))

    def round_trip(account: str, version: int):
        time.sleep(rtt_s)
        return fetch(account, version)

    held: list[float] = []
    saved = clustering_store.fetch_keys_before_writing
    if not keys_first:
        clustering_store.fetch_keys_before_writing = lambda *_args: None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = SqliteDatabase(Path(tmp) / "clustering.db")
            store = clustering_store.ClusteringStore(_Timed(db, held), gap_s=1800, cipher=FieldCipher(round_trip))
            store.migrate()
            held.clear()
            t0 = time.time() - 86400
            started = time.perf_counter()
            store.ingest([ViewingEvent(event_id=f"e{i}", account_id=f"acc-{i}", device_id="tv", device_type="tv",
                                       ts=t0, kind="heartbeat", title_id="t", genres=("drama",), duration_s=60.0)
                          for i in range(households)])
            call_s = time.perf_counter() - started
            db.close()
    finally:
        clustering_store.fetch_keys_before_writing = saved
    return {"call_s": round(call_s, 3), "write_lock_held_s": round(max(held), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--households", type=int, default=1000)
    p.add_argument("--rtt-ms", type=float, default=2.0)
    a = p.parse_args()
    print(json.dumps({"households": a.households, "rtt_ms": a.rtt_ms,
                      "keys_inside_the_transaction": run(a.households, a.rtt_ms / 1000, False),
                      "keys_before_the_transaction": run(a.households, a.rtt_ms / 1000, True)}))


if __name__ == "__main__":
    main()
