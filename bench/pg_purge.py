"""What the physical purge of an erasure costs on PostgreSQL: ``python -m bench.pg_purge``.

Since an erasure rewrites the service's personal tables whole (``VACUUM FULL`` +
removing the WAL segments, docs/privacy.md §11), its cost grows with the size of those
tables, not of the deleted household. This measures it on the clustering service's real
schema (its migrations), filled with ``--households`` sizes of 20 events and 4 sessions
each whose encrypted columns have the lengths the service writes, on a PostgreSQL with
production defaults (fsync on, full-page writes) plus ``wal_recycle = off``.

Per size and repetition one household is deleted, then either the purge
(``PostgresDatabase.purge_erased``) or, as the baseline measured in the same run, the
plain ``VACUUM (ANALYZE)`` that leaves bytes behind. Medians of ``--reps``. Progress to
stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._common import cpu_model, log

TABLES = ("events", "sessions")


def fill(db, households: int) -> None:
    """20 events and 4 sessions per household, encrypted columns at their stored length."""
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO events (event_id, account_id, device_id, device_type, ts, kind, title_id, series_id, "
            "genres, duration_s, maturity, country, vpn, profile_hint) "
            "SELECT 'ev-' || g, 'hh-' || (g / 20), 'tv-' || (g %% 3), 'tv', 1.7e9 + g, 'play_start', "
            "'enc1:' || repeat(md5(g::text), 2), 'enc1:' || md5(g::text), 'enc1:' || repeat(md5(g::text), 2), "
            "1800, 'adult', 'enc1:' || md5(g::text), 0, NULL FROM generate_series(0, ? - 1) AS g",
            (households * 20,))
        tx.execute(
            "INSERT INTO sessions (session_id, account_id, device_id, device_type, start_ts, end_ts, event_count, "
            "watch_seconds, feature_version, features, label, person_id) "
            "SELECT 'se-' || g, 'hh-' || (g / 4), 'tv-' || (g %% 3), 'tv', 1.7e9 + g, 1.7e9 + g + 3600, 5, 3600, 1, "
            "decode(repeat(md5(g::text), 6) || substr(md5(g::text), 1, 10), 'hex'), NULL, 'p1' "
            "FROM generate_series(0, ? - 1) AS g", (households * 4,))


def table_mb(db) -> float:
    with db.transaction() as tx:
        return sum(tx.query("SELECT pg_total_relation_size(?::regclass)", (f'"{db.schema}"."{t}"',))[0][0]
                   for t in TABLES) / 1e6


def delete_household(db, account: str) -> None:
    from services.common.storage.sql import record_erasure

    with db.transaction() as tx:
        for table in TABLES:
            tx.execute(f"DELETE FROM {table} WHERE account_id = ?", (account,))
        record_erasure(tx)


def plain_vacuum(db) -> None:
    with db._pool.connection() as conn:
        conn.autocommit = True
        for table in TABLES:
            conn.execute(f'VACUUM (ANALYZE) "{db.schema}"."{table}"')
        conn.autocommit = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--households", default="1000,10000,50000")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from services.testing.servers import PostgresServer
    from services.clustering.migrations import MIGRATIONS
    from services.common.storage.sql import PostgresDatabase, migrate

    results = []
    with tempfile.TemporaryDirectory(prefix="hearth-bench-purge-") as tmp:
        Path(tmp).chmod(0o755)   # the postgres user (as root) must reach its data dir
        pg = PostgresServer(Path(tmp) / "pg").init().start()   # production settings, tied to this run
        try:
            import psycopg

            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET wal_recycle = off")
                conn.execute("SELECT pg_reload_conf()")
            for n in [int(x) for x in args.households.split(",")]:
                db = PostgresDatabase(pg.dsn, f"bench_{n}", max_size=2)
                migrate(db, MIGRATIONS, personal_tables=TABLES)
                fill(db, n)
                plain_vacuum(db)
                size = table_mb(db)
                purge_ms, vacuum_ms, complete = [], [], True
                for rep in range(args.reps):
                    for label, run, out in (("purge", lambda: db.purge_erased(TABLES), purge_ms),
                                            ("vacuum", lambda: plain_vacuum(db), vacuum_ms)):
                        delete_household(db, f"hh-{2 * rep + (label == 'vacuum')}")
                        started = time.perf_counter()
                        result = run()
                        out.append((time.perf_counter() - started) * 1e3)
                        if label == "purge":
                            complete = complete and result["complete"]
                row = {"households": n, "events": n * 20, "sessions": n * 4, "tables_mb": round(size, 1),
                       "purge_ms_median": round(statistics.median(purge_ms), 1),
                       "plain_vacuum_ms_median": round(statistics.median(vacuum_ms), 1),
                       "ratio": round(statistics.median(purge_ms) / statistics.median(vacuum_ms), 2),
                       "purge_complete": complete}
                log(f"pg_purge {row}")
                results.append(row)
                db.close()
        finally:
            pg.stop()
    print(json.dumps({"bench": "pg_purge", "date": datetime.now(UTC).strftime("%Y-%m-%d"), "cpu": cpu_model(),
                      "reps": args.reps, "sizes": results}))


if __name__ == "__main__":
    main()
