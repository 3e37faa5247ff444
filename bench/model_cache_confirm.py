"""What a cached household model costs to read when the process holds its version:
``python -m bench.model_cache_confirm [--households N] [--rounds R] [--baseline REF]``.

Since session 29 clustering takes a cached model (Redis) only for a version the database
confirmed (``ClusteringStore.get_model``; docs/security.md, attack28 "Left"): a household
read less often than once a minute per replica reads the database again (review29's
measurement, its driver made this module). On one PostgreSQL and one real redis-server, a
process per tree (this checkout, and ``--baseline``'s tree by ``git archive`` with this
checkout's generated protos) ingests ``--households`` households with a 20 KB model each,
then times ``get_model(account, decoded_version=held)`` of every household in passes:
``unconfirmed`` (the confirmations cleared, as a minute later), ``confirmed`` (right after),
``batch_confirmed`` (cleared, then ``confirm_model_versions`` per 100 households first, its
time included — AssignSessions' message); each twice. Trees alternate per round. Progress to
stderr; the last stdout line is the JSON (per tree and pass: median µs per call, wall and
the caller's CPU, over the rounds).
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
from pathlib import Path

from bench._common import log

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("unconfirmed", "confirmed", "batch_confirmed", "unconfirmed2", "confirmed2", "batch_confirmed2")


def worker(dsn: str, redis_url: str, tag: str, n: int) -> dict:
    from services.clustering.store import ClusteringStore
    from services.common.field_crypto import FieldCipher
    from services.common.storage.cache import RedisCache
    from services.common.storage.sql import PostgresDatabase
    from tests.integration.test_storage import ev

    db = PostgresDatabase(dsn, f"b_{tag}", max_size=4)
    store = ClusteringStore(db, RedisCache(redis_url, f"bench{tag}"), gap_s=1800,
                            cipher=FieldCipher(lambda a, v: (1, b"k" * 32)))
    store.migrate()
    accounts = [f"acc-{i:05d}" for i in range(n)]
    t0 = time.time() - 7 * 86400
    held = {}
    for a in accounts:
        m = store.get_model(a)
        if m is None:
            store.ingest([ev(0, t0, account=a)])
            store.save_model(a, 0, "gmm", os.urandom(20000))
            m = store.get_model(a)
        held[a] = m.version
    out = {}
    for label in PASSES:
        if not label.startswith("confirmed") and hasattr(store, "_confirmed_versions"):
            store._confirmed_versions.clear()   # as after MODEL_CONFIRM_S without a read
        t, c = time.perf_counter(), time.process_time()
        if label.startswith("batch") and hasattr(store, "confirm_model_versions"):
            for first in range(0, n, 100):
                store.confirm_model_versions(accounts[first:first + 100])
        for a in accounts:
            assert store.get_model(a, decoded_version=held[a]).version == held[a]
        out[label] = {"us_per_call_wall": round((time.perf_counter() - t) / n * 1e6, 1),
                      "us_per_call_cpu": round((time.process_time() - c) / n * 1e6, 1)}
    db.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default="ed5316b", help="a commit to run beside this checkout")
    parser.add_argument("--worker", nargs=4, metavar=("DSN", "REDIS_URL", "TAG", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        dsn, url, tag, n = args.worker
        print(json.dumps(worker(dsn, url, tag, int(n))))
        return
    from bench.assign_cpu import extract
    from services.testing.servers import PostgresServer, RedisServer

    with tempfile.TemporaryDirectory(prefix="hearth-bench-modelcache-") as tmp:
        trees = {args.baseline: extract(args.baseline, Path(tmp) / "tree"), "this": ROOT}
        pg = PostgresServer(durable=False).init().start()
        rs = RedisServer().start()
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        try:
            for r in range(args.rounds):
                for k in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    env = dict(os.environ, PYTHONPATH=str(trees[k]), OMP_NUM_THREADS="1")
                    # This file run as a script, the tree's own packages first (PYTHONPATH, cwd).
                    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", pg.dsn, rs.url,
                                        k.replace("-", "_"), str(args.households)],
                                       env=env, capture_output=True, text=True, cwd=trees[k], check=True)
                    runs[k].append(json.loads(p.stdout.strip().splitlines()[-1]))
                    log(f"model_cache_confirm {k} {runs[k][-1]}")
        finally:
            pg.remove()
            rs.stop()
    print(json.dumps({"bench": "model_cache_confirm", "households": args.households, "rounds": args.rounds,
                      "load1": round(os.getloadavg()[0], 1),
                      "median": {k: {p: {m: statistics.median(x[p][m] for x in v)
                                         for m in ("us_per_call_wall", "us_per_call_cpu")} for p in PASSES}
                                 for k, v in runs.items()},
                      "runs": runs}))


if __name__ == "__main__":
    main()
