"""A SQLite database that cannot take a write now — its disk full, its file read-only, an
I/O error, a lock held past the busy timeout — is ``Unavailable`` (gRPC UNAVAILABLE, HTTP
503 with Retry-After), not an unexpected error (INTERNAL, 502 "upstream error" and a
traceback per request, as until session 20 with the data directory's disk full), and the
thread's connection is left outside any transaction, so writes work again as soon as
there is room (docs/operations.md, "Fault drills")."""

from __future__ import annotations

import pytest

from services.common.errors import Unavailable
from services.common.storage.sql import SqliteDatabase


def test_a_full_database_is_unavailable_and_writes_work_again_when_there_is_room(tmp_path):
    db = SqliteDatabase(tmp_path / "full.db")
    with db.transaction() as tx:
        tx.execute("CREATE TABLE t (v BLOB)")
    conn = db._conn()   # this thread's connection: cap its file at the pages it has (a full disk)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(Unavailable) as info:
        with db.transaction() as tx:
            tx.execute("INSERT INTO t VALUES (?)", (b"x" * 200_000,))
    assert "full" in str(info.value)
    assert not conn.in_transaction
    conn.execute(f"PRAGMA max_page_count = {pages * 1000}")   # room again
    with db.transaction() as tx:
        tx.execute("INSERT INTO t VALUES (?)", (b"x" * 200_000,))
    with db.transaction(readonly=True) as tx:
        assert tx.query("SELECT count(*) FROM t") == [(1,)]
    db.close()


def test_a_wrong_statement_is_still_an_error_of_its_own(tmp_path):
    db = SqliteDatabase(tmp_path / "x.db")
    with pytest.raises(Exception) as info:
        with db.transaction() as tx:
            tx.execute("SELECT * FROM no_such_table")
    assert not isinstance(info.value, Unavailable)
    db.close()
