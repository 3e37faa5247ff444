"""`hearth db provision-roles` under a managed PostgreSQL's admin — a login that is no
superuser: `NOSUPERUSER CREATEROLE CREATEDB`, owning the database it made (Amazon
RDS/Aurora's `rds_superuser`, Cloud SQL's `cloudsqlsuperuser`, Azure's `azure_pg_admin`).

Until session 30 such a run revoked PUBLIC's EXECUTE on the large-object functions, which
only warned, then stopped on `ALTER ROLE … NOSUPERUSER` with a traceback; session 30 refused
it before doing anything. Since session 31 it provisions: what only a superuser may do is
read back or named per service (``not_done``), and the four services run under the roles
it made, and a backup is restored by it. On the machine's PostgreSQL (15) and the bundled 16
(where a CREATEROLE login gets ADMIN OPTION, but neither SET nor INHERIT, on what it creates).
An admin lacking CREATEROLE or the database is refused, naming what it lacks."""

from __future__ import annotations

import json
import os

import psycopg
from psycopg.conninfo import make_conninfo

from services import cli
from services.common.backup import postgres_sessions_in_use
from services.common.storage import roles
from services.testing import inprocess
from tests.helpers.servers import bundled_postgres16, fresh_database
from tests.helpers.waiting import wait_for
from tests.integration.test_postgres_roles import denied, purge_after_an_erasure, stored, write_household
from tests.integration.test_postgres_roles_converge import _backup_env, _dsns, _set_env, _state, _tag


def _database_of_admin(server_dsn: str, admin: str, attributes: str, owner: bool = True) -> tuple[str, str]:
    """A new database and the DSN of a new login ``admin`` with ``attributes``, made by
    the fixtures' superuser as a managed server's provider would; ``owner``: the login owns
    the database (as the one that made it on a managed server)."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{admin}" LOGIN {attributes}')
    database = fresh_database(server_dsn, "roleadmin")
    if owner:
        with psycopg.connect(database, autocommit=True) as conn:
            name = conn.execute("SELECT current_database()").fetchone()[0]
            conn.execute(f'ALTER DATABASE "{name}" OWNER TO "{admin}"')
    return database, make_conninfo(database, user=admin)


def _old_login_owning_clustering(database: str, admin: str, tag: str, table: str) -> str:
    """The single-login layout in little: an old login — made by the admin, as on a
    managed server — owning clustering's schema and one table (``table``: its name and
    columns); its name."""
    legacy = f"{tag}_legacy"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{legacy}" LOGIN')
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA hearth_clustering AUTHORIZATION "{legacy}"')
        conn.execute(f"CREATE TABLE hearth_clustering.{table}")
        conn.execute(f'ALTER TABLE hearth_clustering.{table.split()[0]} OWNER TO "{legacy}"')
    return legacy


def _refused(database: str, admin: str, tag: str, monkeypatch, capsys) -> str:
    """Runs `hearth db provision-roles` as ``admin``, which must be refused with nothing
    changed (no role made, PUBLIC's CONNECT kept); its error."""
    _set_env(monkeypatch, admin, _dsns(database, tag))
    before = _state(database, tag)
    assert cli.main(["db", "provision-roles"]) == 2
    err = capsys.readouterr().err
    assert "nothing was changed" in err, err
    assert _state(database, tag) == before
    return err


def _attributes(database: str, tag: str) -> dict[str, tuple]:
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin, "
            "rolinherit FROM pg_roles WHERE rolname = ANY(%s)", ([f"{tag}_{s}" for s in roles.SERVICES],)).fetchall()
    return {name: tuple(rest) for name, *rest in rows}


def test_a_managed_servers_admin_provisions_and_the_services_run_under_their_roles(
        each_postgres_dsn, monkeypatch, capsys, tmp_path, request):
    sixteen = request.node.callspec.params["each_postgres_dsn"] == "16"
    if sixteen:   # pg_dump refuses a newer server than its own: the 16 server's own tools
        monkeypatch.setenv("PATH", f"{bundled_postgres16()}{os.pathsep}{os.environ['PATH']}")
    tag = _tag()
    database, admin = _database_of_admin(each_postgres_dsn, f"{tag}_dba", "NOSUPERUSER CREATEROLE CREATEDB")
    dsns = _dsns(database, tag)
    _set_env(monkeypatch, admin, dsns)
    # The upgrade from the single-login layout: the old login (the admin made it, as
    # on a managed server) owns clustering's schema and a table, handed over by this run.
    legacy = _old_login_owning_clustering(database, admin, tag, "old_layout (x serial)")

    assert cli.main(["db", "provision-roles", "--keep-access-for", legacy]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert (report["clustering"]["previous_owner"], report["clustering"]["objects_handed_over"]) == (legacy, 1)
    assert {s: done["kept_access_for"] for s, done in report.items()} == {s: legacy for s in roles.SERVICES}
    assert _attributes(database, tag) == {
        f"{tag}_{s}": (False, False, False, False, False, True, True) for s in roles.SERVICES}
    for service, done in report.items():
        assert done["created_role"] and done["created_schema"] == (service != "clustering"), done
        # What only a superuser may do is named, never skipped in silence: PUBLIC keeps
        # its large-object functions (counted instead), pg_switch_wal() is not granted,
        # nor on 16 pg_checkpoint (15's CREATEROLE may grant it).
        assert done["large_objects"] == {"owned": 0, "creatable": True}, done
        assert any("pg_switch_wal()" in item for item in done["not_done"]), done
        assert any("GRANT pg_checkpoint" in item for item in done["not_done"]) == sixteen, done

    # A compromised clustering login's setting on itself (attack29b), undone by the next
    # run under this admin as under a superuser.
    with psycopg.connect(dsns["clustering"], autocommit=True) as conn:
        conn.execute("ALTER ROLE CURRENT_USER SET statement_timeout = 1")
    # One only a superuser may set (and reset): it stays, named.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{tag}_feedback" SET log_statement = none')
    assert cli.main(["db", "provision-roles"]) == 0, capsys.readouterr().err
    again = json.loads(capsys.readouterr().out)
    assert again["clustering"]["settings_reset"] == ["statement_timeout=1"], again["clustering"]
    assert {s: done["revoked_access_for"] for s, done in again.items()} == {s: [legacy] for s in roles.SERVICES}
    assert again["feedback"]["settings_reset"] == [], again["feedback"]
    assert any("settings a superuser set on the role stay (log_statement=none)" in item
               for item in again["feedback"]["not_done"]), again["feedback"]
    assert not again["clustering"]["created_role"]

    mesh = inprocess.start(tmp_path / "mesh", storage="postgres", postgres_dsns=dsns)
    try:
        write_household(mesh, "managed")
        assert stored(database, "managed") == (5, 1)
    finally:
        mesh.stop()
    # Each service's tables are its own and no other's.
    assert "permission denied for schema hearth_privacy" in denied(dsns["clustering"],
                                                                   "SELECT * FROM hearth_privacy.data_keys")
    assert "permission denied" in denied(dsns["clustering"], "CREATE TABLE public.planted (x int)")
    # The erasure purge without pg_switch_wal(): the tables still rewritten, the receipt
    # incomplete and naming why.
    purge = purge_after_an_erasure(dsns["feedback"], "hearth_feedback")
    assert not purge["complete"] and "no privilege to remove WAL segments" in purge["action"], purge

    # A backup restored by this admin (it sets each schema aside, makes it anew for its
    # role and re-applies the roles: a superuser's work until now).
    logins = [f"{tag}_{service}" for service in roles.SERVICES]
    wait_for(lambda: not postgres_sessions_in_use(database, logins), what="the stopped services' sessions gone")
    _backup_env(monkeypatch, tmp_path, dsns)
    assert cli.main(["backup", "--out", str(tmp_path / "backups")]) == 0, capsys.readouterr().err
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["snapshot"]
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("DELETE FROM hearth_clustering.events")
    monkeypatch.setenv("HEARTH_POSTGRES_DSN", admin)
    assert cli.main(["restore", snapshot]) == 0, capsys.readouterr().err
    assert stored(database, "managed") == (5, 1)
    restored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert restored["roles"] == {s: f"{tag}_{s}" for s in roles.SERVICES}


def test_an_admin_without_createrole_or_the_database_is_refused_naming_both(postgres_dsn, monkeypatch, capsys):
    tag = _tag()
    database, admin = _database_of_admin(postgres_dsn, f"{tag}_dba", "NOSUPERUSER CREATEDB", owner=False)
    err = _refused(database, admin, tag, monkeypatch, capsys)
    assert f"role {tag}_dba is no superuser and lacks CREATEROLE" in err, err
    assert "ownership of database roleadmin_" in err, err


def test_a_service_role_with_replication_is_refused_under_an_admin_that_may_not_take_it_away(
        postgres_dsn, monkeypatch, capsys):
    """Only a superuser may state NOREPLICATION (even to take it away): the run refuses,
    naming it, rather than leave a service's login able to stream the whole cluster."""
    tag = _tag()
    database, admin = _database_of_admin(postgres_dsn, f"{tag}_dba", "NOSUPERUSER CREATEROLE CREATEDB")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{tag}_privacy" LOGIN REPLICATION')
    err = _refused(database, admin, tag, monkeypatch, capsys)
    assert f"role {tag}_privacy has REPLICATION, which only a superuser may take away" in err, err


def test_a_public_schema_the_admin_may_not_close_is_refused_naming_its_owner(postgres_dsn, monkeypatch, capsys):
    """A cluster upgraded from before 15 keeps ``public`` the bootstrap superuser's, with
    CREATE for PUBLIC: another login's REVOKE only warns, and every service's login could
    still make tables outside its schema. Refused, naming the owner."""
    tag = _tag()
    database, admin = _database_of_admin(postgres_dsn, f"{tag}_dba", "NOSUPERUSER CREATEROLE CREATEDB")
    with psycopg.connect(database, autocommit=True) as conn:
        superuser = conn.execute("SELECT current_user").fetchone()[0]
        conn.execute(f'ALTER SCHEMA public OWNER TO "{superuser}"')
        conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    err = _refused(database, admin, tag, monkeypatch, capsys)
    assert f"PUBLIC may still CREATE in schema public (owned by {superuser})" in err, err


def test_on_16_a_service_role_another_login_made_is_refused_naming_the_grant_needed(postgres16_dsn, monkeypatch,
                                                                                   capsys):
    """From 16 a CREATEROLE login may grant (itself too) only the roles it holds WITH ADMIN
    OPTION — those it made. A service role made by another login (here the superuser):
    refused, naming the role and the GRANT that lets the run go on."""
    tag = _tag()
    database, admin = _database_of_admin(postgres16_dsn, f"{tag}_dba", "NOSUPERUSER CREATEROLE CREATEDB")
    with psycopg.connect(postgres16_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{tag}_clustering" LOGIN')
    err = _refused(database, admin, tag, monkeypatch, capsys)
    assert (f"role {tag}_dba may not make itself a member of role {tag}_clustering, which it did not create"
            in err), err
    assert f"GRANT {tag}_clustering TO {tag}_dba WITH ADMIN OPTION" in err, err
    # The GRANT it names lets the next run through.
    with psycopg.connect(postgres16_dsn, autocommit=True) as conn:
        conn.execute(f'GRANT "{tag}_clustering" TO "{tag}_dba" WITH ADMIN OPTION')
    assert cli.main(["db", "provision-roles"]) == 0, capsys.readouterr().err
    assert not json.loads(capsys.readouterr().out)["clustering"]["created_role"]


def test_a_lock_held_by_an_old_pod_is_named_to_an_admin_that_may_not_see_its_session(postgres_dsn, monkeypatch,
                                                                                   capsys):
    """pg_stat_activity hides another login's state and times from a login that is no
    superuser (nor pg_read_all_stats, nor a member of it): the lock timeout's message
    still names the pid, login and table, and says what it could not see."""
    tag = _tag()
    database, admin = _database_of_admin(postgres_dsn, f"{tag}_dba", "NOSUPERUSER CREATEROLE CREATEDB")
    legacy = _old_login_owning_clustering(database, admin, tag, "events (event_id text PRIMARY KEY)")
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'GRANT CONNECT ON DATABASE "{conn.info.dbname}" TO "{legacy}"')
    pod = psycopg.connect(make_conninfo(database, user=legacy, application_name="old-clustering-pod"))
    pid = pod.info.backend_pid
    try:
        pod.execute("SELECT count(*) FROM hearth_clustering.events").fetchone()
        _set_env(monkeypatch, admin, _dsns(database, tag))
        assert cli.main(["db", "provision-roles", "--keep-access-for", legacy, "--lock-timeout", "1"]) == 2
    finally:
        pod.close()
    err = capsys.readouterr().err
    assert f"pid {pid} (user {legacy}, application old-clustering-pod, its state and age hidden from this admin" \
        in err, err
    assert "hearth_clustering.events (AccessShareLock)" in err, err
    assert "None" not in err, err


def test_an_admin_owning_the_database_through_a_role_it_belongs_to_provisions(postgres_dsn, monkeypatch, capsys):
    """A database owned by a group role the admin login is a member of (a provider's admin
    group) counts as the admin's: PUBLIC's CONNECT revoked, each service's granted."""
    tag = _tag()
    database, admin = _database_of_admin(postgres_dsn, f"{tag}_dba", "NOSUPERUSER CREATEROLE CREATEDB", owner=False)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{tag}_admins" NOLOGIN')
        conn.execute(f'GRANT "{tag}_admins" TO "{tag}_dba"')
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" OWNER TO "{tag}_admins"')
    _set_env(monkeypatch, admin, _dsns(database, tag))
    assert cli.main(["db", "provision-roles"]) == 0, capsys.readouterr().err
    with psycopg.connect(database) as conn:
        acl = conn.execute("SELECT datacl::text FROM pg_database WHERE datname = current_database()").fetchone()[0]
    assert "=Tc/" not in acl and f"{tag}_clustering=c/" in acl, acl     # PUBLIC's gone, the services' in
