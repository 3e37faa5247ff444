"""The usual ingest: small batches of one known household (``ClusteringStore.ingest`` in
process, a real ``FieldCipher``), on SQLite and PostgreSQL, this checkout against baseline
commits' trees, rounds alternating the order of the sides.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.ingest_usual --baselines ed5316b,bed44f9 \\
        --backends sqlite,postgres --rounds 6 --out /tmp/ingest-usual.json

Each round of each side is a process of its own, from its own tree (``bench.assign_cpu.
extract``), on a database of its own (SQLite in a temporary directory; a schema of its own on
one throwaway PostgreSQL server, fsync off): ``--households`` households with one event each
(keys warmed, each household's first batch done before timing), then ``--batches`` batches
of ``--events`` events, each of one household in turn, each device's stream in time order
(the newest session extended: the usual IngestEvents). The process's CPU time per batch
(the client's: PostgreSQL's server is not counted) and the wall per batch.

JSON (printed, and written to ``--out``): per backend and side, each round's ms per batch
(CPU and wall), their medians, each side's median over the first baseline's, the load
average, the UTC start and end. (session 30, store30: session 29 left about 0.3 ms a batch
on PostgreSQL over ed5316b untraced.)"""

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

# Run inside each side's tree; prints one JSON line.
_ROUND = r'''
import json, statistics, sys, time
from services.clustering.domain.events import ViewingEvent
from services.clustering.store import ClusteringStore
from services.common.field_crypto import FieldCipher
from services.privacy.keys.domain import KeyRing, generate_kek

backend, where, households, batches, per_batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
if backend == "sqlite":
    from services.common.storage.sql import SqliteDatabase
    db = SqliteDatabase(where)
else:
    from services.common.storage.sql import PostgresDatabase
    dsn, schema = where.rsplit("|", 1)
    db = PostgresDatabase(dsn, schema, max_size=4)
ring = KeyRing([generate_kek("k1")], "k1")

def fetch(account, version):
    if version == 0 and not ring.has_dek(account):
        from datetime import UTC, datetime
        ring.create_dek(account, datetime.now(UTC))
    return ring.data_key(account, version or None)

store = ClusteringStore(db, gap_s=1800.0, cipher=FieldCipher(fetch))
store.migrate()
t0 = time.time() - 2 * 86400
accounts = [f"acc-{i:03d}" for i in range(households)]
clock = {a: t0 + i for i, a in enumerate(accounts)}
count = 0

def batch_of(account):
    global count
    out = []
    for _ in range(per_batch):
        count += 1
        clock[account] += 30.0
        out.append(ViewingEvent(event_id=f"e{count}", account_id=account, device_id="tv-1", device_type="tv",
                                ts=clock[account], kind="heartbeat", title_id=f"title-{count % 7}",
                                series_id="show-1", genres=("drama", "crime"), duration_s=30.0, maturity="adult"))
    return out

for a in accounts:
    store.ingest(batch_of(a))
cpu, wall = [], []
for k in range(batches):
    events = batch_of(accounts[k % households])
    w, c = time.perf_counter(), time.process_time()
    result = store.ingest(events)
    cpu.append(time.process_time() - c)
    wall.append(time.perf_counter() - w)
    assert result.accepted == per_batch, result
db.close()
print(json.dumps({"cpu_ms_per_batch": round(1000 * sum(cpu) / batches, 4),
                  "wall_ms_per_batch": round(1000 * sum(wall) / batches, 4),
                  "wall_ms_median": round(1000 * statistics.median(wall), 4)}))
'''


def one_round(tree: Path, backend: str, where: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _ROUND, backend, where, str(args.households), str(args.batches),
                          str(args.events)], cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baselines", default="ed5316b,bed44f9", help="commits, comma-separated (ratios over the first)")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--households", type=int, default=50)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--events", type=int, default=10, help="events a batch")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    started, load0 = time.time(), os.getloadavg()[0]
    baselines = [b for b in args.baselines.split(",") if b]
    result: dict = {"baselines": baselines, "rounds": args.rounds, "households": args.households,
                    "batches": args.batches, "events_per_batch": args.events, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="hearth-ingest-usual-") as tmp:
        work = Path(tmp)
        sides = {b: extract(b, work / f"tree-{b}") for b in baselines}
        sides["this"] = ROOT
        pg = None
        try:
            for backend in args.backends.split(","):
                if backend == "postgres" and pg is None:
                    from services.testing.servers import PostgresServer
                    pg = PostgresServer(durable=False).init().start()
                runs: dict[str, list[dict]] = {label: [] for label in sides}
                for n in range(args.rounds):
                    order = list(sides)[n % len(sides):] + list(sides)[:n % len(sides)]
                    for label in (order if n % 2 == 0 else order[::-1]):
                        tag = f"{label.replace('-', '_')}_{n}"
                        where = str(work / f"{tag}.db") if backend == "sqlite" else f"{pg.dsn}|u_{tag}"
                        runs[label].append(one_round(sides[label], backend, where, args))
                entry: dict = {}
                for label, rs in runs.items():
                    entry[label] = {"runs": rs, **{f"median_{k}": round(statistics.median(r[k] for r in rs), 4)
                                                   for k in ("cpu_ms_per_batch", "wall_ms_per_batch")}}
                first = entry[baselines[0]] if baselines else None
                if first is not None:
                    for label in sides:
                        entry[label]["over_" + baselines[0]] = {
                            k: round(entry[label][f"median_{k}"] / first[f"median_{k}"], 3)
                            for k in ("cpu_ms_per_batch", "wall_ms_per_batch")}
                result["backends"][backend] = entry
        finally:
            if pg is not None:
                pg.remove()
    result.update(run_window(started, load0))
    return emit(result, args.out)


if __name__ == "__main__":
    main()
