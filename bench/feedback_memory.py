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

Where the resident set is, per round (session 31, mem31): glibc's ``mallinfo2`` summed over
its arenas (``malloc_in_use_mb``: live C and large Python blocks; ``malloc_free_mb``: freed
blocks glibc still holds, i.e. fragmentation; ``malloc_mmap_mb``) and pymalloc's arenas
(``pymalloc_arenas_mb`` held, ``pymalloc_used_mb`` in live blocks), so a rise of the
resident set reads as memory still referenced (retention) or memory freed but kept
(fragmentation). ``--check-threads T``: the periodic check and the report run on T
threads in turn, as a gRPC server's workers serve GetCalibration (each thread allocates
from its own glibc arena). ``--idle-rounds K``: after the labelled rounds, K rounds that add
no label but still refit every calibrator and report (does anything grow with time or
refits rather than with labels?).
``--label-window N``: the labels calibration reads (``HEARTH_FEEDBACK_LABEL_WINDOW``;
0 = every label held, the behaviour before session 31). With ``--trim``,
``malloc_free_mb`` still counts the free pages given back to the system: read ``rss_mb``.
``--backend postgres``: the store on a PostgreSQL the bench starts (a pool of 16), as in
the soak; ``sqlite_mb`` is then only the process's other SQLite use.
Progress to stderr; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo2


def allocator_mb() -> dict:
    """glibc's heap (all arenas) and pymalloc's arenas, in MB."""
    info = _LIBC.mallinfo2()
    out = {"malloc_in_use_mb": round(info.uordblks / 1e6, 2), "malloc_free_mb": round(info.fordblks / 1e6, 2),
           "malloc_mmap_mb": round(info.hblkhd / 1e6, 2)}
    stats = _pymalloc_stats()
    if stats:
        out.update(stats)
    return out


def _pymalloc_stats() -> dict:
    """pymalloc's arenas held and bytes in live blocks, from ``sys._debugmallocstats`` (it
    writes to the C stderr: redirected to a file for the call)."""
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    values = {}
    for line in text.splitlines():
        name, _, number = line.rpartition("=")
        if number.strip().replace(",", "").isdigit():
            values[name.strip()] = int(number.strip().replace(",", ""))
    arenas = values.get("# arenas allocated current")
    if arenas is None:
        return {}
    return {"pymalloc_arenas_mb": round(arenas * (1 << 20 if sys.version_info >= (3, 10) else 1 << 18) / 1e6, 2),
            "pymalloc_used_mb": round(values.get("# bytes in allocated blocks", 0) / 1e6, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--per", type=int, default=100)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--trim", action="store_true")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--check-threads", type=int, default=1)
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--idle-rounds", type=int, default=0)
    ap.add_argument("--label-window", type=int, default=FeedbackPolicy.label_window,
                    help="labels calibration reads (HEARTH_FEEDBACK_LABEL_WINDOW; 0 = all, as before session 31)")
    args = ap.parse_args(argv)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="feedback-memory-"))
    path = workdir / "feedback.db"
    pg = None
    if args.backend == "postgres":   # the soak's backend: each check's read passes through libpq
        from services.common.storage.sql import PostgresDatabase
        from services.testing.servers import PostgresServer

        pg = PostgresServer().init().start()
        db = PostgresDatabase(pg.dsn, "feedback_memory", max_size=16)
    else:
        db = SqliteDatabase(path)
    store = FeedbackStore(db)
    store.migrate()
    app = FeedbackApp(store, FeedbackPolicy(recalibrate_min_new=50, label_window=args.label_window))
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
    # Each checker is one thread (a gRPC worker): round r's check and report run on r % T.
    checkers = [ThreadPoolExecutor(1, thread_name_prefix=f"check{t}") for t in range(args.check_threads)]

    def check(refit: bool) -> None:
        if refit:   # an idle round: no new label, so refit on purpose
            app.calibration.recalibrate()
        app.periodic_check()
        app.calibration.report("", 10)

    with ThreadPoolExecutor(10) as pool:
        for r in range(args.rounds + args.idle_rounds):
            idle = r >= args.rounds
            if not idle:
                list(pool.map(one, range(r * args.per, (r + 1) * args.per)))
            checkers[r % len(checkers)].submit(check, idle).result()
            gc.collect()
            if args.trim:
                _LIBC.malloc_trim(0)
            row = {"round": r, "labels": min(r + 1, args.rounds) * args.per, "idle": idle,
                   "rss_mb": round(rss_mb(), 1),
                   "sqlite_mb": round(_SQLITE.sqlite3_memory_used() / 1e6, 2),
                   "db_mb": round(path.stat().st_size / 1e6, 2) if pg is None else None,
                   "connections": len(db._all) if pg is None else None,
                   "calibrator_version": app.calibration.calibrator_version(), **allocator_mb()}
            if args.trace:
                row["python_heap_mb"] = round(tracemalloc.get_traced_memory()[0] / 1e6, 3)
                if r in (args.rounds // 4, args.rounds + args.idle_rounds - 1):
                    snapshots.append(tracemalloc.take_snapshot())
            rounds.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    for checker in checkers:
        checker.shutdown()
    top = []
    if len(snapshots) == 2:
        for stat in snapshots[1].compare_to(snapshots[0], "traceback")[:10]:
            top.append({"kB": round(stat.size_diff / 1e3, 1), "blocks": stat.count_diff,
                        "where": stat.traceback.format()[-6:]})
    app.close()
    db.close()
    if pg is not None:
        pg.remove()
    result = {"bench": "feedback_memory", "utc": datetime.now(UTC).isoformat(timespec="seconds"),
              "rounds": args.rounds, "per_round": args.per, "trace": args.trace, "trim": args.trim,
              "check_threads": args.check_threads, "idle_rounds": args.idle_rounds,
              "label_window": args.label_window, "backend": args.backend,
              "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "PYTHONMALLOC"))},
              "seconds": round(time.time() - started, 1), "per_round_rows": rounds, "top_differences": top}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
