"""`hearth restore` with a login per service: a schema whose `pg_restore` fails is left as
it was, not empty (review29 of 39ad934).

Since attack29 the admin drops each schema and recreates it empty, owned by the service's
role, and the dump is restored over the service's own login — two logins, so not one
transaction. A `pg_restore` that then failed (the service's login refused, the server
gone, a full disk) left the schema empty. For privacy's that lost the deletion ledger of
the database being replaced: the re-run the error asked for found no privacy database
and refused without `--ledger`, and the deletions made since the snapshot were known
nowhere else unless an off-site ledger had been exported. Now the old schema is set aside
until its restore succeeds and put back when it fails. Real PostgreSQL; the failure is a
real `pg_restore` that cannot reach the server (its connection string names a closed port)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from services import cli
from services.common import backup as snapshots
from services.testing.mesh import free_port
from tests.integration.test_restore_as_service_roles import backup_then_a_deletion, schemas_under_service_logins

pytestmark = pytest.mark.postgres

TAG = f"f{uuid.uuid4().hex[:6]}"


def _jobs(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT job_id FROM hearth_privacy.deletion_jobs ORDER BY job_id")]


def _snapshot_then_a_deletion(postgres_dsn, monkeypatch, tmp_path, capsys, tag: str) -> tuple[str, dict, str]:
    """(admin DSN, the services' DSNs, a snapshot) with a deletion made after the snapshot."""
    admin, dsns = schemas_under_service_logins(postgres_dsn, "restore_fail", tag, monkeypatch)
    snapshot = backup_then_a_deletion(tmp_path, capsys, dsns["privacy"])
    assert _jobs(dsns["privacy"]) == ["job-later"]
    return admin, dsns, snapshot


def test_a_schema_whose_restore_fails_is_left_as_it_was_and_the_rerun_keeps_later_deletions(
        postgres_dsn, monkeypatch, tmp_path, capsys):
    admin, dsns, snapshot = _snapshot_then_a_deletion(postgres_dsn, monkeypatch, tmp_path, capsys, TAG)
    libpq_call = snapshots._libpq_call

    def unreachable_for_privacy(dsn, variable="HEARTH_POSTGRES_DSN"):
        conninfo, env = libpq_call(dsn, variable)
        if variable == "HEARTH_POSTGRES_DSN_PRIVACY":   # privacy's pg_restore cannot connect
            conninfo = psycopg.conninfo.make_conninfo(conninfo, port=free_port(), connect_timeout=3)
        return conninfo, env

    monkeypatch.setattr(snapshots, "_libpq_call", unreachable_for_privacy)
    assert cli.main(["restore", snapshot]) == 2
    err = capsys.readouterr().err
    assert _jobs(dsns["privacy"]) == ["job-later"]          # privacy's schema as it was, ledger included
    assert "pg_restore of hearth_privacy" in err and "left as it was" in err, err
    with psycopg.connect(admin) as conn:                    # nothing set aside left behind
        assert conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'hearth\\_%%' "
                            "ORDER BY 1").fetchall() == [(f"hearth_{s}",) for s in sorted(dsns)]

    monkeypatch.setattr(snapshots, "_libpq_call", libpq_call)
    assert cli.main(["restore", snapshot]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [j["replaces"] for j in report["requeued_jobs"]] == ["job-later"]
    with psycopg.connect(admin) as conn:
        owners = dict(conn.execute(
            "SELECT n.nspname, array_agg(DISTINCT pg_get_userbyid(c.relowner)) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname LIKE 'hearth\\_%%' GROUP BY 1").fetchall())
    assert owners == {f"hearth_{s}": [f"{TAG}_{s}"] for s in dsns if f"hearth_{s}" in owners}, owners
    assert "hearth_privacy" in owners


def test_a_restore_killed_with_a_schema_set_aside_is_put_back_before_the_next_reads_the_ledger(
        postgres_dsn, monkeypatch, tmp_path, capsys):
    """What a restore killed after setting privacy's schema aside leaves: the schema
    renamed, an empty (or half-restored) one in its place. The next restore puts the old
    one back before it reads the ledger, so the deletion made after the snapshot is
    re-applied (without that it found no privacy database and refused)."""
    tag = f"g{uuid.uuid4().hex[:6]}"
    admin, dsns, snapshot = _snapshot_then_a_deletion(postgres_dsn, monkeypatch, tmp_path, capsys, tag)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER SCHEMA hearth_privacy RENAME TO hearth_privacy_before_restore")
        conn.execute(f'CREATE SCHEMA hearth_privacy AUTHORIZATION "{tag}_privacy"')
    assert cli.main(["restore", snapshot]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["put_back_before_restore"] == ["hearth_privacy"]
    assert [j["replaces"] for j in report["requeued_jobs"]] == ["job-later"]
    with psycopg.connect(admin) as conn:
        assert not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname LIKE '%%before_restore'").fetchall()
