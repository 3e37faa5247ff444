"""Privacy's database on another PostgreSQL server than the other three services' ("Keep
the privacy service's database in the same or another cluster", docs/operations.md): the
session's two real clusters, the machine's (clustering, attribution, feedback) and the
bundled 16 (privacy). Until session 30 `hearth db provision-roles` made privacy's role and
schema on the admin DSN's server, said so (exit 0), left privacy's own server without
them, and privacy then stopped at start (`role "…" does not exist`): drilled with real
processes, docs/operations.md "Database roles"."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
from hearth.privacy.v1 import privacy_pb2 as ppb
from psycopg.conninfo import make_conninfo

from services import cli
from services.common.storage import roles
from services.testing import inprocess
from tests.helpers.servers import bundled_postgres16, fresh_database
from tests.integration.test_postgres_roles import delete_household, stored, write_household
from tests.integration.test_postgres_roles_converge import _backup_env, _set_env

OTHERS = ("clustering", "attribution", "feedback")


def _made(database: str, tag: str) -> tuple[list[str], list[str]]:
    """This test's roles on ``database``'s server, and the services' schemas in it."""
    with psycopg.connect(database) as conn:
        made = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s ORDER BY 1",
                                           (f"{tag}\\_%",))]
        schemas = [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'hearth\\_%' "
                                              "ORDER BY 1")]
    return made, schemas


def test_privacy_on_another_server_is_provisioned_there_by_a_run_of_its_own(
        postgres_dsn, postgres16_dsn, monkeypatch, capsys, tmp_path):
    tag = f"n{uuid.uuid4().hex[:6]}"
    main_db, privacy_db = fresh_database(postgres_dsn, "rolenode"), fresh_database(postgres16_dsn, "rolenode")
    # One database name on both servers, as a deployment would have it ("hearth").
    privacy_db = make_conninfo(privacy_db, dbname=psycopg.conninfo.conninfo_to_dict(main_db)["dbname"])
    with psycopg.connect(postgres16_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{psycopg.conninfo.conninfo_to_dict(main_db)["dbname"]}"')
    dsns = {s: make_conninfo(privacy_db if s == "privacy" else main_db, user=f"{tag}_{s}", password=f"pw-{tag}-{s}")
            for s in roles.SERVICES}

    # All four in one run with the main server's admin DSN: refused, naming privacy's.
    _set_env(monkeypatch, main_db, dsns)
    assert cli.main(["db", "provision-roles"]) == 2
    err = capsys.readouterr().err
    assert "HEARTH_POSTGRES_DSN_PRIVACY: names server 127.0.0.1:" in err and "--service privacy" in err, err
    assert "nothing was changed" in err, err
    assert _made(main_db, tag) == ([], []) and _made(privacy_db, tag) == ([], [])

    # A run per server, each with its own admin DSN and only its services' DSNs.
    for service in roles.SERVICES:
        monkeypatch.delenv(roles.service_dsn_variable(service))
    _set_env(monkeypatch, main_db, {s: dsns[s] for s in OTHERS})
    assert cli.main(["db", "provision-roles", *(a for s in OTHERS for a in ("--service", s))]) == 0
    assert sorted(json.loads(capsys.readouterr().out)) == sorted(OTHERS)
    _set_env(monkeypatch, privacy_db, {"privacy": dsns["privacy"]})
    assert cli.main(["db", "provision-roles", "--service", "privacy"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["privacy"]
    assert _made(main_db, tag) == (sorted(f"{tag}_{s}" for s in OTHERS), sorted(f"hearth_{s}" for s in OTHERS))
    assert _made(privacy_db, tag) == ([f"{tag}_privacy"], ["hearth_privacy"])

    # The services run on the two servers under their roles: a household erased across them.
    mesh = inprocess.start(tmp_path / "mesh", storage="postgres", postgres_dsns=dsns,
                           privacy={"deletion_poll_s": 0.05, "deletion_retry_base_s": 0.05})
    try:
        write_household(mesh, "far")
        assert stored(main_db, "far") == (5, 1)
        assert delete_household(mesh, "far").state == ppb.JOB_STATE_COMPLETED
    finally:
        mesh.stop()
    assert stored(main_db, "far") == (0, 0)
    with psycopg.connect(privacy_db) as conn:
        assert conn.execute("SELECT count(*) FROM hearth_privacy.deletion_jobs").fetchone()[0] == 1

    # A backup over the four DSNs, wherever they are (pg_dump 16 reads both servers); a
    # restore, which recreates every schema on the admin's one server, is refused.
    monkeypatch.setenv("PATH", f"{bundled_postgres16()}{os.pathsep}{os.environ['PATH']}")
    _backup_env(monkeypatch, tmp_path, dsns)
    assert cli.main(["backup", "--out", str(tmp_path / "backups")]) == 0, capsys.readouterr().err
    snapshot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["snapshot"]
    monkeypatch.setenv("HEARTH_POSTGRES_DSN", main_db)
    before = _made(main_db, tag), _made(privacy_db, tag)
    assert cli.main(["restore", snapshot]) == 2
    err = capsys.readouterr().err
    assert "HEARTH_POSTGRES_DSN_PRIVACY: names server" in err and "restores the schemas of one server" in err, err
    assert (_made(main_db, tag), _made(privacy_db, tag)) == before
