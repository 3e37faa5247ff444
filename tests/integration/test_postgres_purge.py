"""PostgreSQL's physical purge after an erasure (``PostgresDatabase.purge_erased``),
shown by raw bytes: every file of the data directory — heap, TOAST, indexes,
``pg_statistic`` and ``pg_wal`` — is read back and searched for marker strings. Erased
markers must be absent, and the markers of rows that were kept must still be found by
the same scan (it sees the stores)."""

from __future__ import annotations

import secrets

import pytest

from services.common.storage import sql
from services.common.storage.sql import Migration, PostgresDatabase, migrate, record_erasure
from tests.helpers.servers import PURGEABLE_WAL, data_dir_files, running_postgres

TABLES = ("notes",)
MIGRATIONS = [Migration(1, "notes", "CREATE TABLE notes (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, "
                                    "body TEXT NOT NULL, blob {blob});\n"
                                    "CREATE INDEX notes_by_account ON notes (account_id, body)")]


def holders(pg, marker: str) -> list[str]:
    needle = marker.encode()
    return [name for name, blob in data_dir_files(pg).items() if needle in blob]


def fill(db, tag: str, n: int = 300) -> None:
    """Rows whose every value carries the marker; the large (incompressible) value goes
    to TOAST."""
    with db.transaction() as tx:
        tx.executemany("INSERT INTO notes (id, account_id, body, blob) VALUES (?, ?, ?, ?)",
                       [(f"{tag}-id{i}", f"{tag}-acct", f"{tag}-body{i % 3}", (f"{tag}-toast" + secrets.token_hex(2500)).encode())
                        for i in range(n)])


@pytest.fixture(scope="module")
def pg():
    with running_postgres(**PURGEABLE_WAL) as server:
        yield server


@pytest.fixture
def db(pg, request):
    database = PostgresDatabase(pg.dsn, f"purge_{request.node.name[:40].lower()}", max_size=3)
    migrate(database, MIGRATIONS, personal_tables=TABLES)
    yield database
    database.close()


def erase(db, sql: str, params=()) -> None:
    """What a store's Erase does: delete, and note in the same transaction that a purge
    is owed."""
    with db.transaction() as tx:
        tx.execute(sql, params)
        record_erasure(tx)


def filenode(db) -> int:
    with db.transaction() as tx:
        return tx.query("SELECT pg_relation_filenode('notes')")[0][0]


def analyze_and_checkpoint(db) -> None:
    """What autovacuum and the checkpointer would do on their own: sample statistics,
    write every page home."""
    with db._pool.connection() as conn:
        conn.autocommit = True
        conn.execute("ANALYZE notes")
        conn.execute("CHECKPOINT")


def test_erased_rows_leave_no_byte_in_heap_indexes_statistics_or_wal(pg, db):
    fill(db, "zrgone")
    fill(db, "zrkept")
    analyze_and_checkpoint(db)
    before = holders(pg, "zrgone-body")
    assert any(name.startswith("base/") for name in before), before      # heap and index
    assert any(name.startswith("pg_wal/") for name in before), before    # and the WAL
    assert holders(pg, "zrgone-toast")

    erase(db, "DELETE FROM notes WHERE account_id = ?", ("zrgone-acct",))
    purge = db.purge_erased(TABLES)

    assert purge["complete"], purge
    assert "VACUUM (FULL, ANALYZE) notes" in purge["action"] and "CHECKPOINT" in purge["action"]
    for marker in ("zrgone-id", "zrgone-acct", "zrgone-body", "zrgone-toast"):
        assert holders(pg, marker) == [], marker
    # The same scan still sees what was kept: in the heap and index files.
    assert any(name.startswith("base/") for name in holders(pg, "zrkept-body"))
    assert holders(pg, "zrkept-toast")


def test_personal_tables_are_kept_out_of_planner_statistics(pg, db):
    fill(db, "zrstat")
    analyze_and_checkpoint(db)
    with db.transaction() as tx:
        sampled = tx.query("SELECT count(*) FROM pg_stats WHERE schemaname = ? AND tablename = 'notes'",
                           (db.schema,))[0][0]
        targets = {r[0] for r in tx.query(
            "SELECT a.attstattarget FROM pg_attribute a WHERE a.attrelid = 'notes'::regclass AND a.attnum > 0")}
    assert sampled == 0 and targets == {0}
    # Idempotent: a second start changes nothing and does not fail.
    migrate(db, MIGRATIONS, personal_tables=TABLES)


def test_a_transaction_older_than_the_erasure_makes_the_purge_incomplete(pg, db, monkeypatch):
    """VACUUM FULL keeps rows that an older snapshot may still see: the purge waits for
    such transactions, and when one outlives the wait the receipt says so (complete
    False) instead of claiming bytes are gone that are not."""
    import psycopg

    fill(db, "zrseen", n=20)
    monkeypatch.setattr(sql, "OLD_TRANSACTION_WAIT_S", 0.5)
    with psycopg.connect(pg.dsn) as reader:
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT count(*) FROM pg_class").fetchone()   # takes and holds its snapshot
        erase(db, "DELETE FROM notes")
        purge = db.purge_erased(TABLES)
        assert not purge["complete"] and "older than the erasure" in purge["action"], purge
        assert holders(pg, "zrseen-body")   # indeed still there: the old snapshot may read it
    # Nor does a transaction holding the table keep the purge waiting for ever.
    with psycopg.connect(pg.dsn) as holder:
        holder.execute(f'SELECT count(*) FROM "{db.schema}".notes').fetchone()   # ACCESS SHARE until it ends
        purge = db.purge_erased(TABLES)
        assert not purge["complete"] and "stayed locked" in purge["action"], purge
    # Once that transaction ended, the purge completes and the bytes go.
    purge = db.purge_erased(TABLES)
    assert purge["complete"], purge
    assert holders(pg, "zrseen-body") == []


def test_settings_that_keep_wal_segments_are_named_and_the_purge_is_not_complete():
    with running_postgres(wal_recycle="on") as server:
        database = PostgresDatabase(server.dsn, "purge_recycle", max_size=2)
        try:
            migrate(database, MIGRATIONS, personal_tables=TABLES)
            erase(database, "DELETE FROM notes")
            purge = database.purge_erased(TABLES)
            assert not purge["complete"]
            retry = database.purge_erased(TABLES)   # still owed: the retry tries again
        finally:
            database.close()
    assert not purge["complete"] and "wal_recycle=on" in purge["action"], purge
    assert not retry["complete"] and "VACUUM (FULL" in retry["action"], retry


def test_a_retried_erase_that_found_nothing_does_not_rewrite_again_but_a_crashed_purge_is_redone(pg, db):
    """The purge rewrites whole tables, so it runs only when an erasure is owed one: the
    retry of an Erase whose answer was lost answers at once; an Erase that died between
    its DELETE and its purge leaves the debt for the retry (which itself deletes nothing)."""
    fill(db, "zrretry", n=20)
    erase(db, "DELETE FROM notes WHERE account_id = ?", ("zrretry-acct",))
    assert db.purge_erased(TABLES)["complete"]
    rewritten = filenode(db)

    again = db.purge_erased(TABLES)   # nothing deleted since: nothing owed
    assert again["complete"] and "nothing left to purge" in again["action"], again
    assert filenode(db) == rewritten

    fill(db, "zrcrash", n=20)
    erase(db, "DELETE FROM notes WHERE account_id = ?", ("zrcrash-acct",))   # ... and the process dies here
    assert holders(pg, "zrcrash-body")
    retry = db.purge_erased(TABLES)
    assert retry["complete"] and "VACUUM (FULL, ANALYZE) notes" in retry["action"], retry
    assert filenode(db) != rewritten and holders(pg, "zrcrash-body") == []
