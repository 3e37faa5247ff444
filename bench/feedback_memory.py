"""Does the feedback service's memory grow with its predictions, labels and
recalibrations? ``python -m bench.feedback_memory [--rounds R] [--per N] [--trace]``.

soak29 (docs/benchmarks.md, "Soak: the whole mesh for 40 minutes, with faults") saw
feedback's resident set rise 21-67 MB/h after its first recalibration. This drives the
real ``FeedbackApp`` in process on a SQLite store, much faster than the soak: per round,
``--per`` predictions and a label on each (``record_predictions`` + ``record_feedback``,
from 10 threads like the gRPC workers: each thread its own SQLite connection, household
disagreement check included), then the periodic check (cohort triggers, recalibration
when 50 new labels arrived, gauges) and a GetCalibration report. Per round: the resident
set, SQLite's own allocator (``sqlite3_memory_used``: its page caches, outside Python's
heap), the database file. ``--trace``: the Python heap (tracemalloc, 25 frames) per round
and the largest differences by traceback between the quarter round and the last.
``--trim``: ``malloc_trim(0)`` after each round (freed heap glibc keeps vs memory held).
Progress to stderr; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from services.common.storage.sql import SqliteDatabase
from services.feedback.app import FeedbackApp
from services.feedback.domain.signals import SignalKind
from services.feedback.policy import FeedbackPolicy
from services.feedback.store import FeedbackStore, PredictionRecord

_SQLITE = ctypes.CDLL("libsqlite3.so.0")   # the library Python's sqlite3 module links
_SQLITE.sqlite3_memory_used.restype = ctypes.c_int64


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--per", type=int, default=100)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--trim", action="store_true")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="feedback-memory-"))
    path = workdir / "feedback.db"
    db = SqliteDatabase(path)
    store = FeedbackStore(db)
    store.migrate()
    app = FeedbackApp(store, FeedbackPolicy(recalibrate_min_new=50))
    rng = random.Random(1)

    def one(i: int) -> None:
        account = f"acct{i % 30}"
        p = rng.uniform(0.5, 0.95)
        app.intake.record_predictions([PredictionRecord(
            f"p{i}", account, f"s{i}", "a", {"a": p, "b": 1 - p}, "v1", 1, time.time(), False, 2,
            f"d{i % 60}", None, None, i % 50, account)])
        right = rng.random() < p
        app.intake.record_feedback(f"f{i}", f"p{i}", SignalKind.PROFILE_CONFIRMED if right
                                   else SignalKind.PROFILE_CORRECTED, None if right else "b", None)

    if args.trace:
        tracemalloc.start(25)
    rounds, snapshots = [], []
    started = time.time()
    with ThreadPoolExecutor(10) as pool:
        for r in range(args.rounds):
            list(pool.map(one, range(r * args.per, (r + 1) * args.per)))
            app.periodic_check()
            app.calibration.report("", 10)
            gc.collect()
            if args.trim:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            row = {"round": r, "labels": (r + 1) * args.per, "rss_mb": round(rss_mb(), 1),
                   "sqlite_mb": round(_SQLITE.sqlite3_memory_used() / 1e6, 2),
                   "db_mb": round(path.stat().st_size / 1e6, 2), "connections": len(db._all),
                   "calibrator_version": app.calibration.calibrator_version()}
            if args.trace:
                row["python_heap_mb"] = round(tracemalloc.get_traced_memory()[0] / 1e6, 3)
                if r in (args.rounds // 4, args.rounds - 1):
                    snapshots.append(tracemalloc.take_snapshot())
            rounds.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    top = []
    if len(snapshots) == 2:
        for stat in snapshots[1].compare_to(snapshots[0], "traceback")[:10]:
            top.append({"kB": round(stat.size_diff / 1e3, 1), "blocks": stat.count_diff,
                        "where": stat.traceback.format()[-6:]})
    app.close()
    db.close()
    result = {"bench": "feedback_memory", "utc": datetime.now(UTC).isoformat(timespec="seconds"),
              "rounds": args.rounds, "per_round": args.per, "trace": args.trace, "trim": args.trim,
              "seconds": round(time.time() - started, 1), "per_round_rows": rounds, "top_differences": top}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
