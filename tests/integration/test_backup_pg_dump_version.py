"""`hearth backup` / `restore` with client tools older than the server or the snapshot
(session 31): the image's pg_dump is Debian bookworm's 15, and pg_dump refuses a server of
a newer major. Until then the backup made the snapshot's directory, failed on the first
schema with pg_dump's words and left the directory behind; any dump failing after others
left their files there, without a manifest, so `--keep` never pruned them (personal data
no "leaves the backups within N periods" reached). A 15 pg_restore cannot read a 16
pg_dump's archive either. On the bundled PostgreSQL 16.2 with the machine's 15 tools and
the wheel's 16 ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import psycopg
import pytest

from services import cli
from tests.helpers.servers import bundled_postgres16, fresh_database


def _machine_major(tool: str) -> int:
    found = shutil.which(tool)
    if not found:
        pytest.fail(f"{tool} (postgresql-client) is not on PATH")
    return int(subprocess.run([found, "--version"], capture_output=True, text=True).stdout.split(")")[1].split(".")[0])


def _schemas(database: str, services: tuple[str, ...]) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        for service in services:
            conn.execute(f"CREATE SCHEMA hearth_{service}")
            conn.execute(f"CREATE TABLE hearth_{service}.marker (note text)")


def test_client_tools_older_than_the_server_or_the_snapshot_are_refused_naming_both(
        postgres16_dsn, monkeypatch, capsys, tmp_path):
    machine_path = os.environ["PATH"]
    assert _machine_major("pg_dump") < 16 and _machine_major("pg_restore") < 16, \
        "this test needs the machine's client tools older than the bundled server (Debian bookworm's 15)"
    database = fresh_database(postgres16_dsn, "dumpver")
    _schemas(database, ("clustering", "attribution", "privacy"))
    monkeypatch.setenv("HEARTH_STORAGE", "postgres")
    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HEARTH_POSTGRES_DSN", database)
    out = tmp_path / "backups"

    # The machine's pg_dump 15 against the 16 server: refused, naming both and the way on.
    assert cli.main(["backup", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "HEARTH_POSTGRES_DSN's server is PostgreSQL 16.2, newer than pg_dump 15." in err, err
    assert "docs/operations.md" in err and "nothing was written" in err, err
    assert not out.exists() or not list(out.iterdir())

    # 16's own tools: feedback's schema is missing, so its dump (the last) fails — and the
    # three dumps before it go with the snapshot's directory.
    monkeypatch.setenv("PATH", f"{bundled_postgres16()}{os.pathsep}{machine_path}")
    assert cli.main(["backup", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pg_dump of hearth_feedback failed (nothing was kept)" in err, err
    assert not list(out.iterdir()), list(out.rglob("*"))

    _schemas(database, ("feedback",))
    assert cli.main(["backup", "--out", str(out)]) == 0, capsys.readouterr().err
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["snapshot"]
    assert json.loads((tmp_path / snapshot / "manifest.json").read_text())["pg_dump"] == "16.2"

    # The machine's pg_restore 15 cannot read 16's archives: refused before anything.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO hearth_clustering.marker VALUES ('after the snapshot')")
    monkeypatch.setenv("PATH", machine_path)
    assert cli.main(["restore", snapshot, "--accept-no-ledger"]) == 2
    err = capsys.readouterr().err
    assert "was made by pg_dump 16.2, which pg_restore 15." in err and "nothing was changed" in err, err
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT note FROM hearth_clustering.marker").fetchall() == [("after the snapshot",)]


def test_a_manifests_pg_dump_that_is_no_version_is_refused_naming_it(tmp_path):
    """The version is read as a number at restore: a manifest written by someone else
    with another value is refused when loaded, in one line (as attack31's other fields)."""
    from services.common import backup

    for value in ("sixteen", 16, "16.2; DROP", "../16"):
        snap = tmp_path / f"snap-{abs(hash(str(value)))}"
        snap.mkdir()
        (snap / backup.MANIFEST).write_text(json.dumps({"format": backup.FORMAT, "backend": "postgres",
                                                        "taken_at": 1.0, "files": {}, "pg_dump": value}))
        with pytest.raises(backup.BackupError, match="pg_dump must be a PostgreSQL version such as 16.2"):
            backup.Snapshot.load(snap)
    assert backup.Snapshot.load(_valid(tmp_path)).pg_dump == "16.2"


def _valid(root) -> object:
    from services.common import backup

    snap = root / "valid"
    snap.mkdir()
    (snap / backup.MANIFEST).write_text(json.dumps({"format": backup.FORMAT, "backend": "postgres",
                                                    "taken_at": 1.0, "files": {}, "pg_dump": "16.2"}))
    return snap
