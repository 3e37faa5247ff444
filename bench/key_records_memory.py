"""Privacy's wrapped key records in memory, and what a data key costs to serve:
``python -m bench.key_records_memory [--households N] [--reps R]``.

Until session 29 privacy's ``KeyService`` loaded every household's key records (data keys
and digest key) into its ``KeyRing`` at start and kept every household it had served for
the process's life: +134 MiB per 100,000 households (session 28). Since, the ring holds a
household's records only while they are fresh (read from the store within ``REFRESH_S``,
5 s: past that they are read again before any use anyway, so they are dropped), at most
``HELD_MAX``, and the start reads only the sample the KEK check tries. This runs both, each
in a fresh process on one SQLite privacy database holding ``--households`` households' keys
(made by the real ``KeyService.data_keys``):

* ``before``: the ring as until session 29 — every record loaded at start, none dropped
  (``KeyService`` given every record, ``_held`` noting times only);
* ``after``: this code.

Per mode, two processes, each a fresh one: the resident set (VmRSS) after the start, after
every household was served once (``data_keys`` in batches of 1,000, as a store's warming
asks), and once ``REFRESH_S`` later, after one more batch (and how many households the ring
then holds), the start's time, and ``data_key`` of one household, median of many calls;
then in a process of its own the Python heap at the same three points (tracemalloc, traced
from before the start: its bookkeeping inflates the resident set and slows allocation).
Freed heap stays in the resident set for the process to reuse, so the heap says what is
held. The latencies, ``hot`` (read from the store
within ``REFRESH_S``: the ring answers) and ``cold`` (past it: the store read again, in
both). Modes alternate (``before, after, after, before, ...``). Progress to stderr; the
last stdout line is the JSON (medians over ``--reps``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._common import cpu_model, log

ROOT = Path(__file__).resolve().parents[1]
KEK = "k1=" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="   # 32 bytes, base64: the bench's only KEK


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fill(path: Path, households: int) -> None:
    from services.common.storage.sql import SqliteDatabase, migrate
    from services.privacy.keys.app import KeyService
    from services.privacy.keys.domain import parse_kek_config
    from services.privacy.keys.store import DataKeyStore
    from services.privacy.migrations import MIGRATIONS

    db = SqliteDatabase(path)
    migrate(db, MIGRATIONS)
    keys = KeyService(DataKeyStore(db), parse_kek_config(KEK), "k1")
    for first in range(0, households, 1000):
        keys.data_keys([f"hh-{i:07d}" for i in range(first, min(households, first + 1000))])
    db.close()


def run_mode(mode: str, path: Path, households: int, heap: bool) -> dict:
    """``heap``: the Python heap traced (tracemalloc; its bookkeeping inflates the resident
    set and slows every allocation, so the resident set, the start's time and the
    latencies come from a process without it)."""
    import random
    import tracemalloc

    from services.common.storage.sql import SqliteDatabase
    from services.privacy.keys import app
    from services.privacy.keys.domain import parse_kek_config
    from services.privacy.keys.store import DataKeyStore

    class HeldForever(app.KeyService):
        """The ring as until session 29: every record at start, none dropped."""

        def __init__(self, store, keks, active):
            super().__init__(store, keks, active, records=store.load())

        def _held(self, account_ids, now):
            for account_id in account_ids:
                self._checked[account_id] = now

    db = SqliteDatabase(path)
    store = DataKeyStore(db)
    accounts = [f"hh-{i:07d}" for i in range(households)]
    base = rss_mib()
    if heap:
        tracemalloc.start(1)
    started = time.perf_counter()
    keys = (HeldForever if mode == "before" else app.KeyService)(store, parse_kek_config(KEK), "k1")
    start_s = time.perf_counter() - started
    after_start, heap_start = rss_mib(), tracemalloc.get_traced_memory()[0] / 2**20
    for first in range(0, households, 1000):
        keys.data_keys(accounts[first:first + 1000])
    after_all, heap_all = rss_mib(), tracemalloc.get_traced_memory()[0] / 2**20
    time.sleep(app.REFRESH_S + 0.5)
    keys.data_keys(accounts[:1000])   # a batch after REFRESH_S: the ring drops the stale ones
    after_refresh, heap_refresh = rss_mib(), tracemalloc.get_traced_memory()[0] / 2**20
    held = len(keys.ring._records)
    if heap:
        tracemalloc.stop()
        db.close()
        return {"heap_start_mib": round(heap_start, 1), "heap_all_served_mib": round(heap_all, 1),
                "heap_after_refresh_mib": round(heap_refresh, 1)}
    rng = random.Random(0)
    last = accounts[-1000:]
    hot = []
    for account in rng.choices(last, k=3000):
        t = time.perf_counter()
        keys.data_key(account)
        hot.append((time.perf_counter() - t) * 1e6)
    time.sleep(app.REFRESH_S + 0.5)
    cold = []
    middle = accounts[1000:-1000]
    for account in rng.sample(middle, min(1500, len(middle))):
        t = time.perf_counter()
        keys.data_key(account)
        cold.append((time.perf_counter() - t) * 1e6)
    db.close()
    return {"mode": mode, "start_s": round(start_s, 2),
            "rss_start_mib": round(after_start - base, 1), "rss_all_served_mib": round(after_all - base, 1),
            "rss_after_refresh_mib": round(after_refresh - base, 1), "households_held": held,
            "hot_data_key_us_median": round(statistics.median(hot), 1),
            "cold_data_key_us_median": round(statistics.median(cold), 1),
            "load1": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--mode", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--heap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, Path(args.db), args.households, args.heap)))
        return
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="hearth-bench-keymem-") as tmp:
        path = Path(tmp) / "privacy.db"
        started = time.perf_counter()
        fill(path, args.households)
        log(f"filled {args.households} households' keys in {time.perf_counter() - started:.0f} s")
        for rep in range(args.reps):
            for mode in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                row = {}
                for heap in ([], ["--heap"]):
                    out = subprocess.run([sys.executable, "-m", "bench.key_records_memory", "--mode", mode, "--db",
                                          str(path), "--households", str(args.households), *heap],
                                         cwd=ROOT, capture_output=True, text=True, check=True)
                    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                log(f"key_records_memory {row}")
                runs[mode].append(row)
    keys = ("start_s", "rss_start_mib", "rss_all_served_mib", "rss_after_refresh_mib", "heap_start_mib",
            "heap_all_served_mib", "heap_after_refresh_mib",
            "hot_data_key_us_median", "cold_data_key_us_median")
    print(json.dumps({"bench": "key_records_memory", "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
                      "cpu": cpu_model(), "households": args.households, "reps": args.reps,
                      **{f"{m}_{k}": round(statistics.median(r[k] for r in rows), 2)
                         for m, rows in runs.items() for k in keys},
                      "runs": runs["before"] + runs["after"]}))


if __name__ == "__main__":
    main()
