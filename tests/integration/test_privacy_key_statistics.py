"""A destroyed data key leaves no copy in PostgreSQL's planner statistics (attack27).

Privacy's key tables were not kept out of the statistics as the stores' personal tables are
(``migrate(personal_tables=...)``): ANALYZE — autovacuum's, and the ``VACUUM (FULL,
ANALYZE)`` of every key purge — copied the ``wrapped`` column, every household's wrapped
data key, into ``pg_statistic`` (readable as ``pg_stats`` by the tables' owner, the role
every service connects as). A key destroyed by an erasure or a rotation was tombstoned
and purged from ``data_keys``, but its wrapped bytes stayed in the statistics sampled
while it was live: seen on a PostgreSQL mesh, a rotated household's destroyed version 3
in ``pg_toast_2619`` (pg_statistic's TOAST) after its purge. With the KEK — the leak a
rotation answers — it opens that version again, and with it every backup sealed under
it, an erased household's included: crypto-shredding undone."""

from __future__ import annotations

import os
from itertools import count

from services.common.storage.sql import PostgresDatabase
from services.privacy.consent.store import ConsentStore
from services.privacy.keys.app import KeyService
from services.privacy.keys.domain import generate_kek
from services.privacy.keys.store import KEY_TABLES, DataKeyStore
from tests.helpers.servers import data_dir_files

_schemas = count()


def test_a_destroyed_data_key_leaves_no_copy_in_planner_statistics(postgres_server):
    db = PostgresDatabase(postgres_server.dsn, f"pkstat{os.getpid()}_{next(_schemas)}", max_size=3)
    try:
        ConsentStore(db).migrate()   # what the privacy process runs at start: every room's tables
        store = DataKeyStore(db)
        keys = KeyService(store, [generate_kek("k1")], "k1")
        for i in range(40):
            keys.data_key(f"acc-{i}")
        gone = [r.wrapped for r in store.load("acc-0")]   # its data key and its digest key
        assert gone and all(gone)
        with db._pool.connection() as conn:   # what autovacuum does on its own
            conn.autocommit = True
            for table in KEY_TABLES:
                conn.execute(f'ANALYZE "{db.schema}"."{table}"')
        purges: list[dict] = []
        assert "data_key:acc-0:v1" in keys.shred("acc-0", purges)
        purge = db.purge_erased(KEY_TABLES)   # as the erasure's: VACUUM (FULL, ANALYZE), CHECKPOINT
        assert "VACUUM (FULL, ANALYZE)" in purge["action"], purge
        with db.transaction(readonly=True) as tx:
            sampled = tx.query("SELECT tablename, attname FROM pg_stats WHERE schemaname = ? AND tablename = ANY(?)",
                               (db.schema, list(KEY_TABLES)))
        assert sampled == [], sampled
        # The WAL is left out: this session's cluster recycles its segments (docs/privacy.md §11).
        holders = [name for name, blob in data_dir_files(postgres_server).items()
                   if not name.startswith("pg_wal/") and any(wrapped in blob for wrapped in gone)]
        assert holders == [], holders
    finally:
        db.close()
