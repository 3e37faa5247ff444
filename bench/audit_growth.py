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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    args = ap.parse_args(argv)
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
