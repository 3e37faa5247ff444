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


def test_a_refused_write_fails_the_database_writes_check_while_the_database_check_passes(tmp_path):
    # Sessions 20 and 23: on a full disk reads and the `database` check's SELECT 1 work,
    # so every service said SERVING while every write answered 503. The writes' own check
    # says so now (not critical: the service stays SERVING, degraded).
    from services.common import health_report
    from services.common.storage.sql import WriteHealth, probe

    now = [1000.0]
    db = SqliteDatabase(tmp_path / "full.db")
    db.writes = WriteHealth(window_s=30.0, clock=lambda: now[0])
    with db.transaction() as tx:
        tx.execute("CREATE TABLE t (v BLOB)")
    with pytest.raises(Exception):
        with db.transaction() as tx:
            tx.execute("SELECT * FROM no_such_table")   # a wrong statement is no refusal
    assert db.writes.probe() == ""
    conn = db._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")   # the disk is full
    with pytest.raises(Unavailable):
        with db.transaction() as tx:
            tx.execute("INSERT INTO t VALUES (?)", (b"x" * 200_000,))
    now[0] += 4
    assert db.writes.probe() == "writes refused: database or disk is full (4 s ago)"
    checks = [health_report.Check("database", lambda: probe(db), True),
              health_report.Check("database writes", db.writes.probe, False)]
    serving, reasons = health_report.run_checks(checks)
    assert serving and reasons == ["database writes: writes refused: database or disk is full (4 s ago)"]
    assert health_report.DEPENDENCY_UP.labels("database writes")._value.get() == 0
    assert health_report.DEPENDENCY_UP.labels("database")._value.get() == 1
    with db.transaction(readonly=True) as tx:   # reads still work
        assert tx.query("SELECT count(*) FROM t") == [(0,)]
    conn.execute(f"PRAGMA max_page_count = {pages * 1000}")   # room again
    with db.transaction() as tx:
        tx.execute("INSERT INTO t VALUES (?)", (b"x" * 200_000,))
    now[0] += 27   # the window after the last refusal
    assert health_report.run_checks(checks) == (True, [])
    assert health_report.DEPENDENCY_UP.labels("database writes")._value.get() == 1
    db.close()


def test_open_database_registers_the_writes_check_beside_the_database(tmp_path):
    from types import SimpleNamespace

    from services.common import health_report
    from services.common.storage.sql import open_database

    before = {c.name: c for c in health_report.checks()}
    try:
        db = open_database(SimpleNamespace(storage="sqlite", data_dir=str(tmp_path)), "t")
        by_name = {c.name: c for c in health_report.checks()}
        assert by_name["database"].critical and not by_name["database writes"].critical
        assert by_name["database writes"].probe() == ""
        db.close()
    finally:
        health_report.clear()
        for check in before.values():
            health_report.register(check.name, check.probe, critical=check.critical)
