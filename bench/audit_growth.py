"""Bytes the audit log stores per entry, with a signed tree head kept per batch (before
session 30) and the thinned history (the latest head and the last of each minute):
``python -m bench.audit_growth [--entries N] [--backend sqlite|postgres|both]``.

soak29 (docs/benchmarks.md, "Soak: the whole mesh for 40 minutes, with faults") saw the
privacy schema grow 46 MB/h at 6 requests/s, 37 % of it ``audit_sth``: the writer's
batches held ~1.2 entries (25,879 entries and 22,239 heads in 40 minutes). This appends
``--entries`` records through the real ``AuditWriter`` (group commit, one transaction per
batch, a durable commit each) one batch at a time, at the soak's shape: a batch of 1 entry,
or of 2 one time in six (1.17 on average), its head signed 1 / 9.3 s after the previous
one on the writer's clock (the soak's 9.3 batches a second, so N entries span N / 10.8 s of
the log's time while the run takes what the commits take). Records are the soak's kind:
a household read by a service principal with a trace id and a small details map.

Twice per backend, on fresh schemas: ``per_batch`` (``tree_head_history_s=0``) and
``thinned`` (the default, 60 s). Per table: rows and bytes on disk (SQLite: ``dbstat``
pages; PostgreSQL: ``pg_total_relation_size``, as written and after a plain ``VACUUM``,
which autovacuum does on its own for the deleted heads), and bytes per entry. The last
stdout line is the JSON.

``--long-minutes M`` (session 31, mem31): instead, the thinned log on PostgreSQL for M
minutes of wall time with the server's autovacuum at its defaults, sampled every
``--sample-s``: the tables' sizes, live and dead tuples and autovacuum runs
(``pg_stat_user_tables``), to see whether the thinning's deletes leave ``audit_sth``
growing with dead tuples or held at what autovacuum leaves (does an operator have to do
anything?), and at the end the table's sizes after ``REINDEX TABLE CONCURRENTLY``.
``--batches-per-s`` paces the writer on the wall clock (default: as fast as
the commits go, more deletes per autovacuum period than the soak's 9.3 a second).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._common import cpu_model, log
from services.common import audit
from services.common.identity import Principal, Role
from services.common.storage.sql import PostgresDatabase, SqliteDatabase
from services.privacy.audit.store import AuditStore
from services.privacy.audit.writer import AuditWriter
from services.privacy.keys.signing import generate_private_key

TABLES = ("audit_entries", "audit_sth", "audit_state")
BATCHES_PER_S = 9.3   # soak29: 22,239 heads in 40 minutes
SERVICE = Principal("svc:clustering", Role.SERVICE)


def _sizes_sqlite(db: SqliteDatabase) -> dict[str, int]:
    with db.transaction() as tx:
        rows = tx.query("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")
    by_name = {name: int(size) for name, size in rows}
    out = {t: by_name.get(t, 0) for t in TABLES}
    # indexes count with their table (as pg_total_relation_size does)
    for name, size in by_name.items():
        if name.startswith("audit_entries_"):
            out["audit_entries"] += size
        elif name.startswith("sqlite_autoindex_audit_sth"):
            out["audit_sth"] += size
        elif name.startswith("sqlite_autoindex_audit_state"):
            out["audit_state"] += size
    return out


def _sizes_postgres(db: PostgresDatabase) -> dict[str, int]:
    with db.transaction() as tx:
        return {t: int(tx.query("SELECT pg_total_relation_size(?::regclass)", (f"{db.schema}.{t}",))[0][0])
                for t in TABLES}


def _rows(db) -> dict[str, int]:
    with db.transaction() as tx:
        return {t: int(tx.query(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in TABLES}


def run_mode(db, mode: str, entries: int, seed: int, dsn: str = "") -> dict:
    rng = random.Random(seed)
    store = AuditStore(db)
    store.migrate()
    clock_at = [1_800_000_000.0]
    writer = AuditWriter(db, generate_private_key(), clock=lambda: clock_at[0],
                         tree_head_history_s=0 if mode == "per_batch" else 60.0).start()
    written = batches = 0
    started = time.perf_counter()
    try:
        while written < entries:
            n = min(2 if rng.random() < 1 / 6 else 1, entries - written)
            records = [audit.make_record(audit.READ_HOUSEHOLD, f"household:h{rng.randrange(30):02d}",
                                         details={"sessions": rng.randrange(1, 50)}, principal=SERVICE,
                                         trace_id=f"{rng.getrandbits(128):032x}") for _ in range(n)]
            writer.append(records)
            written += n
            batches += 1
            clock_at[0] += 1 / BATCHES_PER_S
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    out = {"mode": mode, "entries": written, "batches": batches, "log_seconds": round(batches / BATCHES_PER_S, 1),
           "wall_s": round(seconds, 1), "rows": _rows(db)}
    if isinstance(db, SqliteDatabase):
        out["bytes"] = _sizes_sqlite(db)
    else:
        out["bytes_as_written"] = _sizes_postgres(db)
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:   # VACUUM runs outside a transaction
            for t in TABLES:
                conn.execute(f"VACUUM {db.schema}.{t}")
        out["bytes"] = _sizes_postgres(db)
    out["bytes_per_entry"] = {t: round(b / written, 1) for t, b in out["bytes"].items()}
    out["bytes_per_entry"]["total"] = round(sum(out["bytes"].values()) / written, 1)
    return out


def _table_stats(db: PostgresDatabase) -> dict[str, dict]:
    with db.transaction() as tx:
        rows = tx.query("SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, vacuum_count, "
                        "pg_total_relation_size(relid), pg_relation_size(relid), pg_indexes_size(relid) "
                        "FROM pg_stat_user_tables "
                        "WHERE schemaname = ? AND relname IN ('audit_entries', 'audit_sth')", (db.schema,))
    return {r[0]: {"live": int(r[1]), "dead": int(r[2]), "autovacuums": int(r[3]), "vacuums": int(r[4]),
                   "total_bytes": int(r[5]), "heap_bytes": int(r[6]), "index_bytes": int(r[7])} for r in rows}


def run_long(dsn: str, minutes: float, sample_s: float, batches_per_s: float | None, seed: int = 0) -> dict:
    """The thinned writer on PostgreSQL for ``minutes`` of wall time, autovacuum at the
    server's defaults; a sample of the two tables every ``sample_s``."""
    rng = random.Random(seed)
    db = PostgresDatabase(dsn, "growth_long", max_size=2)
    AuditStore(db).migrate()
    clock_at = [1_800_000_000.0]
    writer = AuditWriter(db, generate_private_key(), clock=lambda: clock_at[0], tree_head_history_s=60.0).start()
    written = batches = 0
    samples = []
    started = time.monotonic()
    next_sample = started
    try:
        while (now := time.monotonic()) - started < minutes * 60:
            if now >= next_sample:
                samples.append({"wall_s": round(now - started, 1), "entries": written, "batches": batches,
                                "log_minutes": round(batches / BATCHES_PER_S / 60, 1), **_table_stats(db)})
                log(json.dumps(samples[-1]))
                next_sample += sample_s
            n = 2 if rng.random() < 1 / 6 else 1
            writer.append([audit.make_record(audit.READ_HOUSEHOLD, f"household:h{rng.randrange(30):02d}",
                                             details={"sessions": rng.randrange(1, 50)}, principal=SERVICE,
                                             trace_id=f"{rng.getrandbits(128):032x}") for _ in range(n)])
            written += n
            batches += 1
            clock_at[0] += 1 / BATCHES_PER_S
            if batches_per_s:
                time.sleep(max(0.0, started + batches / batches_per_s - time.monotonic()))
    finally:
        writer.close()
    final = {"wall_s": round(time.monotonic() - started, 1), "entries": written, "batches": batches,
             "log_minutes": round(batches / BATCHES_PER_S / 60, 1), **_table_stats(db)}
    samples.append(final)
    # What an operator's REINDEX gives back: the primary key keeps a leaf page for each
    # kept head (its neighbours' keys deleted, no later key lands there); rebuilt, they pack.
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"REINDEX TABLE CONCURRENTLY {db.schema}.audit_sth")
    reindexed = _table_stats(db)["audit_sth"]
    db.close()
    sth = [s["audit_sth"] for s in samples if "audit_sth" in s]
    return {"minutes": minutes, "batches_per_s": batches_per_s, "samples": samples,
            "audit_sth_total_bytes_max": max(s["total_bytes"] for s in sth),
            "audit_sth_dead_max": max(s["dead"] for s in sth),
            "audit_sth_autovacuums": sth[-1]["autovacuums"], "audit_sth_after_reindex": reindexed}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--long-minutes", type=float, default=0.0)
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--batches-per-s", type=float, default=None)
    args = ap.parse_args(argv)
    if args.long_minutes > 0:
        from services.testing.servers import PostgresServer

        pg = PostgresServer().init().start()   # durable, autovacuum at its defaults
        try:
            long = run_long(pg.dsn, args.long_minutes, args.sample_s, args.batches_per_s)
        finally:
            pg.remove()
        result = {"bench": "audit_growth", "utc": datetime.now(UTC).isoformat(timespec="seconds"),
                  "cpu": cpu_model(), "long": long}
        print(json.dumps(result))
        return result
    results = []
    work = Path(tempfile.mkdtemp(prefix="audit-growth-"))
    pg = None
    try:
        for backend in (("sqlite", "postgres") if args.backend == "both" else (args.backend,)):
            if backend == "postgres":
                from services.testing.servers import PostgresServer

                pg = PostgresServer().init().start()   # durable: production defaults
            for mode in ("per_batch", "thinned"):
                if backend == "sqlite":
                    db = SqliteDatabase(work / f"{mode}.db")
                else:
                    db = PostgresDatabase(pg.dsn, f"growth_{mode}", max_size=2)
                try:
                    row = {"backend": backend, **run_mode(db, mode, args.entries, seed=0,
                                                             dsn=pg.dsn if pg else "")}
                finally:
                    db.close()
                log(json.dumps(row))
                results.append(row)
    finally:
        if pg is not None:
            pg.remove()
        shutil.rmtree(work, ignore_errors=True)
    result = {"bench": "audit_growth", "utc": datetime.now(UTC).isoformat(timespec="seconds"),
              "cpu": cpu_model(), "entries": args.entries, "runs": results}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
