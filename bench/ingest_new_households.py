"""In process: ``ClusteringStore.ingest`` of one batch of N new households (one event each)
on SQLite with a real ``FieldCipher`` (keys cached first: privacy's part is not measured),
this checkout against a baseline commit's tree (``--baseline``), rounds alternating which
goes first; beside each batch a second connection takes the write lock for one small write
every 20 ms, and its waits are the "every other write waits" half (docs/operations.md).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ingest_new_households --baseline ed5316b \\
        --households 1000,5000 --rounds 3 --out /tmp/ingest-new-households.json
    ... --known: the same households' second event (the per-device path, for comparison)
    ... --late: as --known, the second event 30 s before the first (the full rebuild; ingest31)
    ... --backend postgres: on a throwaway PostgreSQL server (fsync off), a schema a round
    ... --erased-share 0.1: with --known/--late, a tenth of the households hold erased events' digests
    ... --refresh: then each household's model refresh, timed, its write transactions counted and
        what it answered digested (equal on both sides: ``answers_equal``; ingest33), its read
        transactions counted and their seconds summed (consent34)

Each side runs in a process of its own, from its own tree (``bench.assign_cpu.extract``).
JSON (printed, and written to ``--out``): per N and side, each round's batch wall and CPU
seconds, the small write's longest and median wait, the batch's write transaction's
seconds (``write_tx_s``, ingest31: what it holds its locks for), their medians, fixed/baseline ratios of
the medians, the load average, the UTC start and end."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import emit, run_window
from bench.assign_cpu import extract

ROOT = Path(__file__).resolve().parents[1]

# Run inside each side's tree: one batch, the probe beside it; prints one JSON line.
_ROUND = r'''
import contextlib, json, sqlite3, statistics, sys, threading, time
from pathlib import Path
from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore
from services.common.field_crypto import FieldCipher, warm_household_keys
from services.common.storage.sql import PostgresDatabase, SqliteDatabase
from services.privacy.keys.domain import KeyRing, generate_kek

n, where = int(sys.argv[1]), sys.argv[2]
postgres = "|" in where   # "dsn|schema"; else a SQLite file
ring = KeyRing([generate_kek("k1")], "k1")

def fetch(account, version):
    if version == 0 and not ring.has_dek(account):
        from datetime import UTC, datetime
        ring.create_dek(account, datetime.now(UTC))
    return ring.data_key(account, version or None)

db = PostgresDatabase(*where.rsplit("|", 1), max_size=4) if postgres else SqliteDatabase(Path(where))
store = ClusteringStore(db, cipher=FieldCipher(fetch))
store.migrate()
writes = []   # each write transaction's seconds (what it holds its locks for)
reads = []    # each read transaction's seconds (consent34: a refresh's reads in one)
begin = db.transaction

@contextlib.contextmanager
def timed(*a, **kw):
    t0 = time.perf_counter()
    with begin(*a, **kw) as tx:
        yield tx
    (reads if kw.get("readonly") else writes).append(time.perf_counter() - t0)

db.transaction = timed
ts = float(sys.argv[5])   # the run's one instant (an hour ago): both sides' sessions, ids and features alike

def event(account, event_id, at):
    return ViewingEvent(event_id=event_id, account_id=account, device_id="tv-1", device_type="tv", ts=at,
                        kind="heartbeat", title_id="title-1", series_id="show-1", genres=("drama",),
                        duration_s=300.0, maturity="adult")

store.ingest([event("probe-acc", "p0", ts)])
batch = [event(f"h-{i}", f"e{i}", ts) for i in range(n)]
warm_household_keys(store.db, store.cipher, {e.account_id for e in batch})
if sys.argv[3] in ("known", "late"):   # the households' second event: each extends its open session
    # (late: comes 30 s before the first, the full rebuild). --erased-share: that share of the
    # households holds an erased event's digest (of an id "old"), as an erasure of an earlier
    # event leaves it; written directly (an Erase a household took ~0.7 s at load 20: the
    # set-up of 100 dwarfed the batch). Without the fence such an erasure also writes: on
    # both sides the transaction's per-device path takes these households all the same.
    erased = [f"h-{i}" for i in range(int(n * float(sys.argv[6])))]
    store.ingest(batch)
    with begin() as tx:
        tx.executemany("INSERT INTO erased_events (account_id, digest, erased_at) VALUES (?, ?, ?)",
                       [(a, store._digests(a, ["old"])["old"], ts) for a in erased])
    batch = [event(f"h-{i}", f"f{i}", ts + (60.0 if sys.argv[3] == "known" else -30.0)) for i in range(n)]
waits, done = [], threading.Event()

def probe():
    if postgres:   # another household's small write (PostgreSQL locks rows and households, not the database)
        while not done.is_set():
            t0 = time.perf_counter()
            with begin() as tx:
                tx.lock_household("probe-acc")
                tx.execute("UPDATE devices SET last_ts = last_ts WHERE account_id = 'probe-acc'")
            waits.append(time.perf_counter() - t0)
            done.wait(0.02)
        return
    other = sqlite3.connect(where, timeout=120, isolation_level=None)
    k = 0
    while not done.is_set():
        k += 1
        t0 = time.perf_counter()
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE devices SET last_ts = last_ts WHERE account_id = 'probe-acc'")
        other.execute("COMMIT")
        waits.append(time.perf_counter() - t0)
        done.wait(0.02)
    other.close()

prober = threading.Thread(target=probe)
prober.start()
time.sleep(0.1)
writes.clear()
t0, c0 = time.perf_counter(), time.process_time()
result = store.ingest(batch)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
time.sleep(0.1)
done.set()
prober.join()
assert result.accepted == n, result
out = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "probe_max_s": round(max(waits), 3),
       "probe_median_s": round(statistics.median(waits), 4),
       "probes": len(waits), "write_tx_s": round(max(writes), 3)}
if sys.argv[4] == "refresh":   # then each household's model refresh, one after another as the loop does
    import hashlib
    from services.clustering.modeling import ModelKeeper
    keeper = ModelKeeper(store, lambda _account: "gmm")
    writes.clear()
    reads.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    for account in sorted({e.account_id for e in batch}):
        keeper.refresh(account)
    out.update(refresh_s=round(time.perf_counter() - t0, 3), refresh_cpu_s=round(time.process_time() - c0, 3),
               refresh_write_txs=len(writes), refresh_write_tx_s=round(sum(writes), 3),
               refresh_read_txs=len(reads), refresh_read_tx_s=round(sum(reads), 3))
    # what the refreshes answered (every session's person and probabilities, every model's
    # version and variant): equal on both sides when no answer changed
    with begin(readonly=True) as tx:
        rows = tx.query("SELECT account_id, session_id, person_id, person_probs FROM sessions "
                        "ORDER BY account_id, session_id")
        rows += tx.query("SELECT account_id, version, variant FROM household_models ORDER BY account_id")
    out["answers_sha256"] = hashlib.sha256(repr(rows).encode()).hexdigest()
    out["answered_sessions"] = sum(1 for r in rows if len(r) == 4 and r[2] is not None)
print(json.dumps(out))
'''


def one_round(tree: Path, households: int, db: Path | str, kind: str, refresh: bool = False,
              at: float = 0.0, erased_share: float = 0.0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _ROUND, str(households), str(db), kind,
                          "refresh" if refresh else "-", str(at), str(erased_share)],
                         cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="ed5316b")
    p.add_argument("--households", default="1000,5000", help="batch sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--known", action="store_true",
                   help="households the store already holds (each batch event their second): the per-device path")
    p.add_argument("--late", action="store_true",
                   help="as --known, each household's second event 30 s before its first: the full rebuild")
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                   help="postgres: a throwaway server (fsync off), a schema a round")
    p.add_argument("--refresh", action="store_true",
                   help="after the batch, each household's model refresh (ModelKeeper.refresh, one after "
                        "another as the refresh loop does): its seconds, CPU, write transactions, and a "
                        "digest of what it answered (ingest33)")
    p.add_argument("--erased-share", type=float, default=0.0,
                   help="with --known or --late: this share of the households holds an erased event's "
                        "digest before the batch (as an erasure leaves it; ingest33)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    started, load0 = time.time(), os.getloadavg()[0]
    kind = "late" if args.late else "known" if args.known else "new"
    at = round(started - 3600)   # the events' instant, the same for every round and side
    pg = None
    with tempfile.TemporaryDirectory(prefix="hearth-ingest-new-") as tmp:
        work = Path(tmp)
        sides = {"baseline": extract(args.baseline, work / "tree"), "fixed": ROOT}
        result: dict = {"baseline": args.baseline, "rounds": args.rounds, "known": args.known,
                        "late": args.late, "backend": args.backend, "refresh": args.refresh,
                        "erased_share": args.erased_share, "sizes": {}}
        try:
            if args.backend == "postgres":
                from services.testing.servers import PostgresServer
                pg = PostgresServer(durable=False).init().start()
            for size in (int(s) for s in args.households.split(",")):
                runs: dict[str, list[dict]] = {label: [] for label in sides}
                for n in range(args.rounds):
                    for label in (list(sides) if n % 2 == 0 else list(sides)[::-1]):
                        db = f"{pg.dsn}|b_{label}_{size}_{n}" if pg is not None else work / f"{label}-{size}-{n}.db"
                        runs[label].append(one_round(sides[label], size, db, kind, args.refresh, at, args.erased_share))
                entry: dict = {}
                keys = ("wall_s", "cpu_s", "probe_max_s", "write_tx_s") + (
                    ("refresh_s", "refresh_cpu_s", "refresh_write_txs", "refresh_write_tx_s",
                     "refresh_read_txs", "refresh_read_tx_s") if args.refresh else ())
                for label, rs in runs.items():
                    entry[label] = {"runs": rs, **{f"median_{k}": statistics.median(r[k] for r in rs) for k in keys}}
                entry["fixed_over_baseline"] = {
                    k: round(entry["fixed"][f"median_{k}"] / entry["baseline"][f"median_{k}"], 3) for k in keys}
                if args.refresh:   # the same answers on both sides, every round
                    entry["answers_equal"] = len({r["answers_sha256"] for rs in runs.values() for r in rs}) == 1
                result["sizes"][str(size)] = entry
        finally:
            if pg is not None:
                pg.remove()
    result.update(run_window(started, load0))
    return emit(result, args.out)


if __name__ == "__main__":
    main()
