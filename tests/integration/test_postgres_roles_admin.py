"""`hearth db provision-roles` under an admin that is no superuser (a CREATEROLE CREATEDB
login owning the database, as a managed PostgreSQL's): until session 30 the run revoked
PUBLIC's EXECUTE on the large-object functions, which such a login cannot — the server
only warns, and nothing showed it — and then stopped on its first `ALTER ROLE … NOSUPERUSER`
with a raw server error and a traceback. Now it is refused before anything is done,
naming what needs a superuser. On the machine's PostgreSQL (15) and the bundled 16."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import make_conninfo

from services import cli
from tests.helpers.servers import fresh_database
from tests.integration.test_postgres_roles_converge import _dsns, _set_env, _state, _tag


def _public_may_create_large_objects(database: str) -> bool:
    with psycopg.connect(database) as conn:
        return conn.execute(
            "SELECT bool_and(EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
            "WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')) FROM pg_proc p "
            "WHERE p.oid = ANY(ARRAY['lo_create(oid)', 'lo_creat(integer)', 'lo_from_bytea(oid, bytea)']"
            "::regprocedure[])").fetchone()[0]


def test_an_admin_that_is_no_superuser_is_refused_before_anything_is_done(each_postgres_dsn, monkeypatch, capsys):
    tag = _tag()
    admin_role = f"{tag}_dba"
    with psycopg.connect(each_postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{admin_role}" LOGIN CREATEROLE CREATEDB')
    database = fresh_database(each_postgres_dsn, "roleadmin")
    with psycopg.connect(database, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute(f'ALTER DATABASE "{name}" OWNER TO "{admin_role}"')
    admin = make_conninfo(database, user=admin_role)
    _set_env(monkeypatch, admin, _dsns(database, tag))
    before = _state(database, tag)
    assert _public_may_create_large_objects(database)

    assert cli.main(["db", "provision-roles"]) == 2
    err = capsys.readouterr().err
    assert f"role {admin_role} is no superuser" in err, err
    for needs_one in ("NOSUPERUSER", "pg_checkpoint", "pg_switch_wal()", "lo_create", "the server only warns"):
        assert needs_one in err, (needs_one, err)
    assert "nothing was changed" in err, err
    assert _state(database, tag) == before          # no role made, PUBLIC's CONNECT kept
    assert _public_may_create_large_objects(database)
