"""`hearth restore` with a login per service does not run a service's code as the admin
(attack29).

Each schema is its service's own (`hearth db provision-roles`): what a compromised
service's login may do is bounded by it. But its snapshot is its own schema as it left
it, and `hearth restore` ran the dump as HEARTH_POSTGRES_DSN — the admin, a superuser —
so a function the service had written into its schema ran with the admin's rights:
a CHECK constraint's function on every row pg_restore loaded, a trigger on privacy's
tables when the restore re-applied the ledger's deletions. Seen: clustering's role,
planting a CHECK function that promotes it when run by a superuser, was a superuser
after the next backup and restore. Now each schema is restored over its own service's
login (the admin only drops and recreates the empty schema, owned by that role), and
the ledger is read and re-applied over privacy's; a function the dump holds runs as the
service that wrote it.

The probes connect as the service roles, on the session's real PostgreSQL."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import psycopg
import pytest

from services import cli
from services.common import config
from services.common.erasure import ErasureScope, ScopeKind
from services.common.storage.sql import open_database
from services.privacy.backup import _privacy_db
from services.privacy.deletion.domain import new_job
from services.privacy.deletion.store import DeletionJobStore
from tests.helpers.servers import fresh_database, service_logins

pytestmark = pytest.mark.postgres

TAG = f"e{uuid.uuid4().hex[:6]}"


def schemas_under_service_logins(postgres_dsn: str, prefix: str, tag: str, monkeypatch) -> tuple[str, dict[str, str]]:
    """A fresh database with a login per service (provisioned), every service's schema
    migrated over its own login, and the environment `hearth backup`/`restore` read set to
    it: (the admin DSN, each service's DSN)."""
    admin = fresh_database(postgres_dsn, prefix)
    dsns = service_logins(admin, tag)
    monkeypatch.setenv("HEARTH_STORAGE", "postgres")
    monkeypatch.setenv("HEARTH_POSTGRES_DSN", admin)
    for service, dsn in dsns.items():
        monkeypatch.setenv(f"HEARTH_POSTGRES_DSN_{service.upper()}", dsn)
    own = {s: config.load(service_name=s).model_copy(update={"postgres_dsn": d}) for s, d in dsns.items()}
    for service in ("clustering", "attribution", "feedback"):
        open_database(own[service], service).close()
    _privacy_db(own["privacy"]).close()
    return admin, dsns


def backup_then_a_deletion(out, capsys, privacy_dsn: str) -> str:
    """`hearth backup` into ``out``, then a household deletion job (``job-later``) stored
    after it — one only the privacy database being replaced knows: the snapshot's path."""
    assert cli.main(["backup", "--out", str(out)]) == 0
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["snapshot"]
    db = _privacy_db(config.load(service_name="privacy").model_copy(update={"postgres_dsn": privacy_dsn}))
    job = new_job("job-later", ErasureScope(kind=ScopeKind.HOUSEHOLD, account_id="gone-1"), "dpo",
                  "privacy_officer", datetime.now(UTC))
    DeletionJobStore(db).create(job, "req-later", "gdpr_art17", next_due=job.requested_at)
    db.close()
    return snapshot


def _plant(dsn: str, schema: str, role: str) -> None:
    """As the service's role: a function that makes ``role`` a superuser whenever a
    superuser runs it, called by a CHECK constraint on a table of its own (one row) and
    by a trigger on ``trigger_table`` when given."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"""CREATE FUNCTION {schema}.promote() RETURNS boolean LANGUAGE plpgsql AS $$
            BEGIN
              IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE 'ALTER ROLE {role} SUPERUSER';
              END IF;
              RETURN true;
            END $$""")
        conn.execute(f"CREATE TABLE {schema}.innocent (v int CHECK ({schema}.promote()))")
        conn.execute(f"INSERT INTO {schema}.innocent VALUES (1)")
        conn.execute(f"""CREATE FUNCTION {schema}.on_row() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM {schema}.promote(); RETURN NEW; END $$""")


def _superusers(admin: str, roles: list[str]) -> list[str]:
    with psycopg.connect(admin) as conn:
        return [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolsuper AND rolname = ANY(%s)",
                                           (roles,)).fetchall()]


def test_a_restore_runs_no_function_a_service_planted_with_the_admins_rights(postgres_dsn, monkeypatch, tmp_path,
                                                                              capsys):
    admin, dsns = schemas_under_service_logins(postgres_dsn, "restore_roles", TAG, monkeypatch)
    roles = [f"{TAG}_{s}" for s in dsns]

    _plant(dsns["clustering"], "hearth_clustering", f"{TAG}_clustering")
    _plant(dsns["privacy"], "hearth_privacy", f"{TAG}_privacy")
    with psycopg.connect(dsns["privacy"], autocommit=True) as conn:
        conn.execute("CREATE TRIGGER audit_job BEFORE INSERT ON hearth_privacy.deletion_jobs "
                     "FOR EACH ROW EXECUTE FUNCTION hearth_privacy.on_row()")

    # After the snapshot, a deletion: the restore re-queues it (an insert into
    # deletion_jobs, where privacy's trigger waits).
    snapshot = backup_then_a_deletion(tmp_path, capsys, dsns["privacy"])
    assert _superusers(admin, roles) == []

    assert cli.main(["restore", snapshot]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _superusers(admin, roles) == []
    assert [j["replaces"] for j in report["requeued_jobs"]] == ["job-later"]
    # Restored whole, each schema its role's again: the planted table too (its data is
    # the service's own), read back over the service's login.
    with psycopg.connect(dsns["clustering"]) as conn:
        assert conn.execute("SELECT v FROM hearth_clustering.innocent").fetchall() == [(1,)]
    with psycopg.connect(admin) as conn:
        owners = dict(conn.execute(
            "SELECT n.nspname, array_agg(DISTINCT pg_get_userbyid(c.relowner)) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname LIKE 'hearth\\_%%' GROUP BY 1").fetchall())
    assert owners == {f"hearth_{s}": [f"{TAG}_{s}"] for s in dsns if f"hearth_{s}" in owners}
    assert {"hearth_clustering", "hearth_privacy"} <= set(owners)
