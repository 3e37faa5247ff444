"""What the retention purge costs clustering's prediction outbox: ``python -m bench.outbox_purge``.

The privacy service's retention purge erases, in every store, what is older than the
retention period (an ``ErasureScope("*", "window", end=cutoff)``); in clustering that
includes the undelivered predictions about the sessions it deletes
(``services/clustering/prediction_log.py`` ``erase_pending``). The outbox is normally
empty (forwarded every 0.2 s); it is large after a feedback outage. This builds such a
backlog on SQLite (the clustering schema, its migrations): ``--predictions`` recent
predictions in chunks of ``--per-chunk`` (the size of a group commit), plus, among the
oldest chunks, ``--old`` predictions about sessions older than the retention period
(``--households`` households' old sessions and their events, which the purge deletes).
Each repetition copies the prepared database and times ``ClusteringStore.erase`` of the
retention window (the whole Erase: its SQL, the outbox and the WAL checkpoint). Medians
of ``--reps``; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._common import cpu_model, log

DAY = 86400.0


def prepare(path: Path, predictions: int, per_chunk: int, old: int, households: int, now: float) -> int:
    from services.clustering.prediction_log import PredictionLog, _Request
    from services.clustering.store import ClusteringStore
    from services.common.predictions import PredictionRecord
    from services.common.storage.sql import SqliteDatabase

    db = SqliteDatabase(path)
    ClusteringStore(db).migrate()
    start = now - 100 * DAY
    with db.transaction() as tx:
        tx.executemany(
            "INSERT INTO events (event_id, account_id, device_id, device_type, ts, kind, title_id, series_id, "
            "genres, duration_s, maturity, country, vpn, profile_hint) "
            "VALUES (?, ?, 'tv', 'tv', ?, 'play_start', 't', NULL, 'drama', 1800, 'adult', NULL, 0, NULL)",
            [(f"ev-{h}", f"hh-old-{h}", start + h) for h in range(households)])
        tx.executemany(
            "INSERT INTO sessions (session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
            "watch_seconds, feature_version, features, label, person_id) "
            "VALUES (?, ?, 'tv', 'tv', ?, ?, 1, 1800, 1, ?, NULL, 'p1')",
            [(f"se-old-{h}", f"hh-old-{h}", start + h, start + h + 1800, b"\0" * 100) for h in range(households)])

    def record(i: int, account: str, session: str, session_start: float) -> PredictionRecord:
        return PredictionRecord(f"pr-{i:08d}", account, session, "p1", {"p1": 0.7, "p2": 0.3}, "gmm", 3, now,
                                False, 2, "tv", session_start, session_start + 1800, 40, "")

    old_records = [record(i, f"hh-old-{i}", f"se-old-{i}", start + i) for i in range(old)]
    recent = [record(old + i, f"hh-{i % 5000}", f"se-{i}", now - (i % 1000) * 60) for i in range(predictions)]
    log_ = PredictionLog(db, None, batch=per_chunk)
    rows = log_._chunks([_Request(old_records + recent, (), "")], now - 3600)
    log_.close()
    with db.transaction() as tx:
        # The columns the version under test has (the chunk rows' shape changed in session 20).
        columns = [r[1] for r in tx.query("PRAGMA table_info(prediction_chunks)")]
        names = ("chunk_id", "created_at", "predictions", "accounts", "traceparents", "body", "session_from")
        tx.executemany(f"INSERT INTO prediction_chunks ({', '.join(names[:len(rows[0])])}) VALUES "
                       f"({', '.join('?' * len(rows[0]))})", rows)
        assert set(names[:len(rows[0])]) <= set(columns)
    db.purge_erased()
    db.close()
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=200_000)
    parser.add_argument("--per-chunk", type=int, default=20)
    parser.add_argument("--old", type=int, default=20)
    parser.add_argument("--households", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from services.clustering.store import ClusteringStore
    from services.common.erasure import ALL_ACCOUNTS, ErasureScope
    from services.common.storage.sql import SqliteDatabase

    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.db"
        chunks = prepare(template, args.predictions, args.per_chunk, args.old, args.households, now)
        log(f"outbox: {args.predictions + args.old} predictions in {chunks} chunks, "
            f"{template.stat().st_size / 1e6:.1f} MB")
        times, erased = [], None
        for rep in range(args.reps):
            path = Path(tmp) / f"rep{rep}.db"
            shutil.copy(template, path)
            db = SqliteDatabase(path)
            store = ClusteringStore(db)
            started = time.perf_counter()
            outcome = store.erase(ErasureScope(ALL_ACCOUNTS, "window", end=now - 90 * DAY))
            times.append(time.perf_counter() - started)
            erased = outcome.deleted_counts
            db.close()
            path.unlink()
            log(f"rep {rep}: {times[-1]:.3f} s {erased}")
    print(json.dumps({"bench": "outbox_purge", "date": datetime.now(UTC).strftime("%Y-%m-%d"), "cpu": cpu_model(),
                      "predictions": args.predictions + args.old, "chunks": chunks, "per_chunk": args.per_chunk,
                      "erased": erased, "median_s": round(statistics.median(times), 4),
                      "times_s": [round(t, 4) for t in times]}))


if __name__ == "__main__":
    main()
