"""`hearth db provision-roles` given what it cannot use answers as every `hearth` command
does — `error: ...` naming the setting, exit 2 — and changes nothing (review28): a
`--keep-access-for` login that does not exist, or an admin DSN no server answers, ended in
a psycopg traceback."""

from __future__ import annotations

import uuid

import psycopg
from psycopg.conninfo import make_conninfo

from services import cli
from services.common.storage import roles
from tests.helpers.servers import fresh_database


def _service_env(monkeypatch, database: str, tag: str) -> None:
    for s in roles.SERVICES:
        monkeypatch.setenv(roles.service_dsn_variable(s), make_conninfo(database, user=f"{tag}_{s}", password="pw"))


def test_an_unknown_keep_access_for_login_is_named_and_nothing_is_provisioned(postgres_dsn, monkeypatch, capsys):
    database = fresh_database(postgres_dsn, "rolesin")
    tag = f"ri{uuid.uuid4().hex[:6]}"
    _service_env(monkeypatch, database, tag)
    monkeypatch.setenv(roles.ADMIN_DSN_VARIABLE, database)
    assert cli.main(["db", "provision-roles", "--keep-access-for", f"{tag}_nobody"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --keep-access-for") and f"{tag}_nobody" in err, err
    with psycopg.connect(database) as conn:   # one transaction: no role was made
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (f"{tag}%",)).fetchone()[0] == 0


def test_an_admin_dsn_no_server_answers_is_named(postgres_dsn, monkeypatch, capsys):
    tag = f"ri{uuid.uuid4().hex[:6]}"
    _service_env(monkeypatch, postgres_dsn, tag)
    monkeypatch.setenv(roles.ADMIN_DSN_VARIABLE, make_conninfo(postgres_dsn, port="1", password="admin-secret",
                                                                connect_timeout="2"))
    assert cli.main(["db", "provision-roles"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {roles.ADMIN_DSN_VARIABLE}: ") and "admin-secret" not in err, err


def test_service_dsns_naming_another_database_are_refused_before_anything_is_done(postgres_dsn):
    # The admin DSN on one database, the services' on another: the roles and schemas were
    # made in the admin's database (its CONNECT revoked from PUBLIC), the command answered
    # success, and every service then stopped at start on a schema that did not exist.
    admin_db, services_db = fresh_database(postgres_dsn, "rolesadm"), fresh_database(postgres_dsn, "rolessvc")
    tag = f"ri{uuid.uuid4().hex[:6]}"
    dsns = {s: make_conninfo(services_db, user=f"{tag}_{s}", password="pw") for s in roles.SERVICES}
    try:
        roles.provision_roles(admin_db, dsns)
    except ValueError as exc:
        message = str(exc)
    else:
        message = "provisioned"
    assert message.startswith("HEARTH_POSTGRES_DSN_") and psycopg.conninfo.conninfo_to_dict(services_db)["dbname"] \
        in message, message
    with psycopg.connect(admin_db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (f"{tag}%",)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'hearth\\_%'").fetchone()[0] == 0
