"""CPU of the model refresh each ingest batch schedules, in process, by how long the
household's history is (docs/benchmarks.md "The model refresh an ingest batch schedules").

    python -m bench.refresh_cpu [--days 100,400,1200] [--stream-days 30] [--batch 2]

A ``ClusteringApp`` (no background thread) on a store with a ``FieldCipher`` (a real key
ring) on SQLite in a temporary directory. Per history length: a household of three
persons (``bench.verify.household_events``: about two sessions a day) with ``--days`` of
viewing ingested and fitted, then its next ``--stream-days`` of viewing moved to end a
minute ago and streamed in time order, ``--batch`` events a batch, the refresh each batch
schedules run after it (``ModelKeeper.refresh``, as the service's refresh thread does;
sessions close by their device's next session). Prints one JSON object: per history
length, the closed sessions before and after, and the CPU ms per batch (process time) of
the ingest and of the refresh, the refresh also without the batches whose refresh
saved a new model version (folds: every ``MICRO_BATCH`` closed sessions, drift refits)
and per fold. Run it from another tree (``git archive REF | tar -x -C DIR``, with this
tree's generated ``hearth/``) for that commit's figures: it calls only what main has.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from bench.ingest_cpu import _fetcher
from bench.verify import household_events
from services.clustering.app import ClusteringApp
from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore
from services.common.field_crypto import FieldCipher
from services.common.storage.sql import SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek

ACCOUNT = "acct-refresh"


def _event(d: dict) -> ViewingEvent:
    return ViewingEvent(event_id=d["event_id"], account_id=d["account_id"], device_id=d["device_id"],
                        device_type=d["device_type"], ts=datetime.fromisoformat(d["ts"].replace("Z", "+00:00")).timestamp(),
                        kind=d["kind"], title_id=d["title_id"], series_id=d["series_id"], genres=tuple(d["genres"]),
                        duration_s=d["duration_s"], maturity=d["maturity"])


def measure(days: int, stream_days: int, batch: int, root: Path) -> dict:
    store = ClusteringStore(SqliteDatabase(root / f"refresh-{days}.db"),
                            cipher=FieldCipher(_fetcher(KeyRing([generate_kek("k1")], "k1"))))
    store.migrate()
    app = ClusteringApp(store, background=False)
    events = sorted((_event(d) for d in household_events(ACCOUNT, random.Random(days), days + stream_days,
                                                          n_persons=3)), key=lambda e: (e.ts, e.event_id))
    cut = events[-1].ts - stream_days * 86400.0
    history = [e for e in events if e.ts <= cut]
    # the last stream_days, moved to end a minute ago: live, so sessions close by their
    # device's next session (its watermark), as a client's stream closes them
    shift = time.time() - 60.0 - events[-1].ts
    stream = [replace(e, ts=e.ts + shift) for e in events if e.ts > cut]
    for i in range(0, len(history), 1000):
        store.ingest(history[i:i + 1000])
    version, _ = app.keeper.refresh(ACCOUNT)
    closed_before = store.closed_session_count(ACCOUNT)
    ingest = refresh = fold = 0.0
    batches = folds = 0
    for i in range(0, len(stream), batch):
        c0 = time.process_time()
        app.ingest(stream[i:i + batch])
        c1 = time.process_time()
        new_version, _ = app.keeper.refresh(ACCOUNT)
        c2 = time.process_time()
        batches += 1
        ingest += c1 - c0
        refresh += c2 - c1
        if new_version != version:
            folds += 1
            fold += c2 - c1
        version = new_version
    closed_after = store.closed_session_count(ACCOUNT)
    app.close()
    store.db.close()
    return {"closed_sessions": closed_before, "closed_after": closed_after, "batches": batches,
            "ingest_ms_per_batch": round(1e3 * ingest / batches, 3),
            "refresh_ms_per_batch": round(1e3 * refresh / batches, 3),
            "refresh_ms_per_batch_without_folds": round(1e3 * (refresh - fold) / max(1, batches - folds), 3),
            "folds": folds, "ms_per_fold": round(1e3 * fold / folds, 1) if folds else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", default="100,400,1200", help="history lengths in days, comma-separated")
    p.add_argument("--stream-days", type=int, default=30, help="the last days of viewing, streamed")
    p.add_argument("--batch", type=int, default=2, help="events a batch")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        out = {f"days_{d}": measure(int(d), args.stream_days, args.batch, Path(root))
               for d in args.days.split(",")}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
