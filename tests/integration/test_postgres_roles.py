"""A PostgreSQL login per service (`hearth db provision-roles`, services/common/storage/roles.py;
docs/operations.md "Database roles"), on the session's real PostgreSQL: each in a database of
its own (roles are the cluster's, so their names carry the module's tag).

Until session 28 the four services shared one login (attack27 item 3): a compromised
clustering process read and rewrote privacy's keys, deletion jobs and audit log. Here the
probes connect *as the service's role*: the fixtures' login is a superuser, and a check
made with it would pass whatever the grants were."""

from __future__ import annotations

import json
import time
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from hearth.attribution.v1 import attribution_pb2 as apb
from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.common.v1 import common_pb2
from hearth.privacy.v1 import privacy_pb2 as ppb
from services import cli
from services.common import identity
from services.common.config import ConfigError
from services.common.pbutil import float_to_ts
from services.common.storage import roles
from services.common.storage.sql import PostgresDatabase, record_erasure
from services.testing import inprocess
from tests.helpers.servers import fresh_database
from tests.helpers.waiting import SLOW_MACHINE_S

SVC = identity.service_principal("ingest")
OFFICER = identity.Principal("olivia", identity.Role.PRIVACY_OFFICER)
DONE = (ppb.JOB_STATE_COMPLETED, ppb.JOB_STATE_FAILED)
TAG = f"r{uuid.uuid4().hex[:6]}"
PRIVACY_TABLES = ("audit_entries", "data_keys", "digest_keys", "deletion_jobs", "consent")


def service_dsns(database_dsn: str, tag: str) -> dict[str, str]:
    return {s: make_conninfo(database_dsn, user=f"{tag}_{s}", password=f"pw-{tag}-{s}") for s in roles.SERVICES}


def events(account: str, start: float, n: int) -> list[cpb.ViewingEvent]:
    return [cpb.ViewingEvent(event_id=f"{account}-{i}", account_id=account, device_id="tv-1",
                             device_type=cpb.DEVICE_TYPE_TV, ts=float_to_ts(start + i * 300),
                             kind=cpb.EVENT_KIND_HEARTBEAT, title_id=f"title-{i}", genres=["drama"],
                             duration_s=300, maturity=cpb.MATURITY_ADULT) for i in range(n)]


def write_household(mesh, account: str) -> None:
    t0 = time.time() - 3 * 86400
    mesh.stub("clustering", SVC).IngestEvents(iter([cpb.IngestEventsRequest(events=events(account, t0, 5))]))
    mesh.stub("attribution", SVC).RecordTouchpoints(apb.RecordTouchpointsRequest(touchpoints=[
        apb.Touchpoint(touchpoint_id=f"{account}-t1", account_id=account, device_id="tv-1", ts=float_to_ts(t0),
                       channel="email", campaign="c1")]))


def stored(database: str, account: str) -> tuple[int, int]:
    """The household's events in clustering and touchpoints in attribution (read as the
    superuser: what the services stored, not what a role may see)."""
    with psycopg.connect(database) as conn:
        return (conn.execute("SELECT count(*) FROM hearth_clustering.events WHERE account_id = %s",
                             (account,)).fetchone()[0],
                conn.execute("SELECT count(*) FROM hearth_attribution.touchpoints WHERE account_id = %s",
                             (account,)).fetchone()[0])


def delete_household(mesh, account: str) -> ppb.GetDeletionResponse:
    officer = mesh.stub("privacy", OFFICER)
    job = officer.RequestDeletion(ppb.RequestDeletionRequest(
        scope=common_pb2.ErasureScope(account_id=account, household=True), reason="gdpr_art17"))
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:
        r = officer.GetDeletion(ppb.GetDeletionRequest(job_id=job.job_id))
        if r.state in DONE or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def owners(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n "
                            "ON n.oid = c.relnamespace WHERE n.nspname = %s", (schema,)).fetchall()
        rows += conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s",
                             (schema,)).fetchall()
    return {r[0] for r in rows}


def denied(dsn: str, statement: str) -> str:
    """The error ``statement`` gets when run as the login of ``dsn`` ("" when it ran)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege as exc:
            return exc.diag.message_primary or str(exc)
    return ""


def purge_after_an_erasure(dsn: str, schema: str) -> dict:
    """The erasure purge's report, run over ``dsn``'s login after an erasure recorded."""
    db = PostgresDatabase(dsn, schema, max_size=1)
    try:
        with db.transaction() as tx:
            record_erasure(tx)
        return db.purge_erased(())
    finally:
        db.close()


@pytest.fixture(scope="module")
def provisioned(postgres_dsn, tmp_path_factory):
    """A fresh install: roles provisioned on an empty database, then the four services
    started, each with its own DSN (their first migrations run under their roles)."""
    database = fresh_database(postgres_dsn, "roles")
    dsns = service_dsns(database, TAG)
    report = roles.provision_roles(database, dsns)
    mesh = inprocess.start(tmp_path_factory.mktemp("roles-mesh"), storage="postgres", postgres_dsn="",
                           postgres_dsns=dsns, privacy={"deletion_poll_s": 0.05, "deletion_retry_base_s": 0.05,
                                                        "deletion_retry_max_s": 0.2})
    yield database, dsns, report, mesh
    mesh.stop()


def test_each_service_migrates_and_serves_under_its_own_role(provisioned):
    database, dsns, report, mesh = provisioned
    assert {s: (r["role"], r["created_role"], r["created_schema"]) for s, r in report.items()} == {
        s: (f"{TAG}_{s}", True, True) for s in roles.SERVICES}
    write_household(mesh, "roles-a")
    assert stored(database, "roles-a") == (5, 1)
    for service in roles.SERVICES:
        # Every table its migrations made is its role's (the admin made only the schema).
        assert owners(database, f"hearth_{service}") == {f"{TAG}_{service}"}, service
        with psycopg.connect(database) as conn:
            used = {r[0] for r in conn.execute(
                "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = '' AND pid <> pg_backend_pid()").fetchall()}
        assert f"{TAG}_{service}" in used
    # A deletion crosses every service, each erasing and purging under its own role.
    job = delete_household(mesh, "roles-a")
    assert job.state == ppb.JOB_STATE_COMPLETED, job
    assert stored(database, "roles-a") == (0, 0)


def test_clustering_login_cannot_read_or_rewrite_privacy_tables(provisioned):
    database, dsns, _, mesh = provisioned
    write_household(mesh, "roles-b")      # privacy now holds a data key, an audit entry
    clustering = dsns["clustering"]
    for table in PRIVACY_TABLES:
        assert "permission denied for schema hearth_privacy" in denied(clustering, f"SELECT * FROM hearth_privacy.{table}")
        assert "permission denied" in denied(clustering, f"UPDATE hearth_privacy.{table} SET {'account_id' if table != 'audit_entries' else 'seq'} = NULL")
    assert "permission denied" in denied(clustering, "DELETE FROM hearth_privacy.audit_entries")
    assert "permission denied" in denied(clustering, "CREATE TABLE hearth_privacy.planted (x int)")
    assert "permission denied" in denied(clustering, "SELECT * FROM hearth_attribution.touchpoints")
    assert "permission denied" in denied(clustering, f'SET ROLE "{TAG}_privacy"')
    # What PUBLIC had: CREATE on public (gone in 15, revoked for clusters upgraded from
    # before), TEMPORARY and CONNECT on the database, CREATE of schemas.
    assert "permission denied" in denied(clustering, "CREATE TABLE public.planted (x int)")
    assert "permission denied" in denied(clustering, "CREATE TEMP TABLE planted (x int)")
    assert "permission denied" in denied(clustering, "CREATE SCHEMA planted")
    # Its own schema it reaches, with the search path pinned (no options in this DSN).
    with psycopg.connect(clustering) as conn:
        assert conn.execute("SHOW search_path").fetchone()[0] == "hearth_clustering"
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] >= 5
    # The superuser does see the rows clustering was refused: the refusals are the grants'.
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM hearth_privacy.data_keys").fetchone()[0] >= 1


def test_a_service_login_may_not_create_large_objects(provisioned):
    """Large objects belong to the database, in no schema: PUBLIC's default EXECUTE on
    lo_create / lo_creat / lo_from_bytea let a compromised service's login store data
    outside its schema, outside the per-schema dumps and untouched by a restore (attack29;
    nothing in Hearth uses them). Revoked by provisioning; before, the object was made."""
    _, dsns, _, _ = provisioned
    for statement in ("SELECT lo_from_bytea(0, 'planted')", "SELECT lo_create(0)", "SELECT lo_creat(-1)"):
        assert "permission denied for function" in denied(dsns["clustering"], statement), statement


def test_a_role_not_in_the_hearth_database_may_not_connect(provisioned, postgres_dsn):
    database, dsns, _, _ = provisioned
    stranger = f"{TAG}_stranger"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{stranger}" LOGIN')
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(make_conninfo(database, user=stranger)).close()


def test_the_purge_removes_wal_under_a_service_role(provisioned):
    """``pg_checkpoint`` and ``pg_switch_wal`` granted: the erasure purge's WAL step is
    not refused for want of privilege (docs/privacy.md §11)."""
    _, dsns, _, _ = provisioned
    purge = purge_after_an_erasure(dsns["feedback"], "hearth_feedback")
    assert "pg_switch_wal(); CHECKPOINT" in purge["action"], purge
    assert "no privilege" not in purge["action"], purge


def test_provisioning_is_idempotent_and_sets_each_password(provisioned):
    database, dsns, _, _ = provisioned
    again = roles.provision_roles(database, dsns)
    assert {s: (r["created_role"], r["created_schema"], r["objects_handed_over"]) for s, r in again.items()} == {
        s: (False, False, 0) for s in roles.SERVICES}
    with psycopg.connect(database) as conn:
        rows = dict(conn.execute("SELECT rolname, rolpassword LIKE 'SCRAM-SHA-256$%%' AND NOT rolsuper "
                                 "AND NOT rolcreaterole AND NOT rolcreatedb FROM pg_authid WHERE rolname = ANY(%s)",
                                 ([f"{TAG}_{s}" for s in roles.SERVICES],)).fetchall())
    assert rows == {f"{TAG}_{s}": True for s in roles.SERVICES}


def test_refuses_a_login_shared_by_two_services_or_a_superuser(provisioned, postgres_dsn):
    database, dsns, _, _ = provisioned
    shared = {**dsns, "feedback": dsns["clustering"]}
    with pytest.raises(ValueError, match="HEARTH_POSTGRES_DSN_CLUSTERING, HEARTH_POSTGRES_DSN_FEEDBACK"):
        roles.provision_roles(database, shared)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{TAG}_super" LOGIN SUPERUSER')
    with pytest.raises(ValueError, match=f"role {TAG}_super is a superuser"):
        roles.provision_roles(database, {**dsns, "feedback": make_conninfo(database, user=f"{TAG}_super")})
    with pytest.raises(ValueError, match="the admin login is for provisioning only"):
        roles.provision_roles(database, {**dsns, "feedback": make_conninfo(database, user="hearth")})


def test_a_service_whose_login_may_not_use_its_schema_stops_naming_the_fix(provisioned):
    """The DSN of another service's role (a Secret mixed up): the service stops at start
    naming the variable and the command, not at its first migration."""
    _, dsns, _, _ = provisioned
    with pytest.raises(ConfigError, match="has no rights on schema hearth_privacy .*`hearth db provision-roles`"):
        PostgresDatabase(dsns["clustering"], "hearth_privacy", max_size=1)
    with pytest.raises(ConfigError, match="schema hearth_nowhere does not exist .* may not create it"):
        PostgresDatabase(dsns["clustering"], "hearth_nowhere", max_size=1)


def test_a_single_login_database_upgraded_in_place_keeps_its_data(postgres_dsn, tmp_path_factory, monkeypatch,
                                                                   capsys):
    """The upgrade path (docs/operations.md "Database roles", upgrading): a database of
    the single-login layout — every schema and table the old login's — handed over by
    `provision-roles`; each service then starts under its own role with the data it had,
    and the old login reaches none of it."""
    database = fresh_database(postgres_dsn, "rolesup")
    tag = f"{TAG}u"
    legacy = make_conninfo(database, user=f"{tag}_legacy", password="old")
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{tag}_legacy" LOGIN')
        conn.execute(f'GRANT CREATE ON DATABASE "{conninfo_db(database)}" TO "{tag}_legacy"')
    data = tmp_path_factory.mktemp("roles-upgrade")
    mesh = inprocess.start(data, storage="postgres", postgres_dsn=legacy)
    try:
        write_household(mesh, "kept")
    finally:
        mesh.stop()
    assert owners(database, "hearth_privacy") == {f"{tag}_legacy"}

    dsns = service_dsns(database, tag)
    report = roles.provision_roles(database, dsns, keep_access_for=f"{tag}_legacy")
    assert all(r["previous_owner"] == f"{tag}_legacy" and r["objects_handed_over"] > 0 for r in report.values()), report
    # Pods still on the old login keep working until the rollout replaces them.
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT count(*) FROM hearth_privacy.data_keys").fetchone()[0] >= 1
        conn.execute("UPDATE hearth_clustering.events SET ts = ts WHERE account_id = 'kept'")

    mesh = inprocess.start(data, storage="postgres", postgres_dsns=dsns)
    try:
        assert stored(database, "kept") == (5, 1)
        # Read back through the services: the household's export (privacy asks each
        # holder, each under its role, and unwraps the key it stored before).
        export = mesh.stub("privacy", OFFICER).ExportHousehold(ppb.ExportHouseholdRequest(account_id="kept"))
        assert "title-4" in export.export_json and "kept-t1" in export.export_json   # decrypted
        write_household(mesh, "after")
        assert stored(database, "after") == (5, 1)
    finally:
        mesh.stop()
    for service in roles.SERVICES:
        assert owners(database, f"hearth_{service}") == {f"{tag}_{service}"}, service

    # `hearth backup` dumps each schema with its own service's login; `hearth restore`
    # runs as the admin and hands every schema back to its role.
    monkeypatch.setenv("HEARTH_STORAGE", "postgres")
    monkeypatch.setenv("HEARTH_POSTGRES_DSN", dsns["privacy"])
    for service, dsn in dsns.items():
        monkeypatch.setenv(roles.service_dsn_variable(service), dsn)
    assert cli.main(["backup", "--out", str(data / "backups")]) == 0
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["snapshot"]
    monkeypatch.setenv("HEARTH_POSTGRES_DSN", database)
    assert cli.main(["restore", snapshot]) == 0
    restored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert restored["roles"] == {s: f"{tag}_{s}" for s in roles.SERVICES}
    for service in roles.SERVICES:
        assert owners(database, f"hearth_{service}") == {f"{tag}_{service}"}, service
    assert stored(database, "kept") == (5, 1) and stored(database, "after") == (5, 1)
    db = PostgresDatabase(dsns["clustering"], "hearth_clustering", max_size=1)   # starts: it may use its schema
    db.close()

    # Retired (docs/operations.md, step 5): a run without --keep-access-for revokes its
    # memberships; it lost CONNECT with PUBLIC's (it was granted nothing of its own).
    retired = roles.provision_roles(database, dsns)
    assert {s: r["revoked_access_for"] for s, r in retired.items()} == {s: [f"{tag}_legacy"] for s in roles.SERVICES}
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(legacy).close()


def conninfo_db(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return conninfo_to_dict(dsn)["dbname"]


def test_the_cli_reads_every_dsn_from_the_environment_and_names_what_is_missing(provisioned, monkeypatch, capsys):
    database, dsns, _, _ = provisioned
    for name in [n for n in __import__("os").environ if n.startswith("HEARTH_POSTGRES_")]:
        monkeypatch.delenv(name)
    assert cli.main(["db", "provision-roles"]) == 2
    assert "HEARTH_POSTGRES_ADMIN_DSN is required" in capsys.readouterr().err
    monkeypatch.setenv("HEARTH_POSTGRES_ADMIN_DSN", database)
    monkeypatch.setenv("HEARTH_POSTGRES_DSN_CLUSTERING", dsns["clustering"])
    assert cli.main(["db", "provision-roles"]) == 2
    assert ("HEARTH_POSTGRES_DSN_ATTRIBUTION, HEARTH_POSTGRES_DSN_PRIVACY, HEARTH_POSTGRES_DSN_FEEDBACK required"
            in capsys.readouterr().err)
    for service, dsn in dsns.items():
        monkeypatch.setenv(roles.service_dsn_variable(service), dsn)
    assert cli.main(["db", "provision-roles"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["privacy"]["role"] == f"{TAG}_privacy"
    assert f"pw-{TAG}" not in out      # the passwords are set, never printed
