"""`hearth db provision-roles` resets what a service's login set on its own role (attack29b).

A login may change its own role-wide defaults (`ALTER ROLE CURRENT_USER SET …`, also in
one database): no boundary is crossed, but a compromised service could leave
`statement_timeout = 1` behind, and every later start of the service failed until an admin
found it; provisioning re-stated only the per-database `search_path`. Against the real
PostgreSQL the fixtures start."""

from __future__ import annotations

import json
import uuid

import psycopg
from psycopg.conninfo import make_conninfo

from services import cli
from services.common.storage import roles
from tests.helpers.servers import fresh_database


def _settings(dsn: str) -> tuple[str, str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return tuple(conn.execute(f"SHOW {name}").fetchone()[0]
                     for name in ("statement_timeout", "work_mem", "search_path"))


def test_provisioning_resets_the_settings_a_service_role_gave_itself(postgres_dsn, monkeypatch, capsys):
    database, tag = fresh_database(postgres_dsn, "roleset"), f"s{uuid.uuid4().hex[:6]}"
    dsns = {s: make_conninfo(database, user=f"{tag}_{s}", password=f"pw-{tag}-{s}") for s in roles.SERVICES}
    roles.provision_roles(database, dsns)
    before = _settings(dsns["clustering"])
    dbname = psycopg.conninfo.conninfo_to_dict(database)["dbname"]
    with psycopg.connect(dsns["clustering"], autocommit=True) as conn:   # as clustering's own login
        # Not attack29b's 1 ms: this test's own SHOWs run under the setting, and under CI load
        # a SHOW took over 1 ms and was cancelled (the project's CI on c5b742a4). Any value
        # the service never set proves the reset as well.
        conn.execute("ALTER ROLE CURRENT_USER SET statement_timeout = 4711")
        conn.execute(f'ALTER ROLE CURRENT_USER IN DATABASE "{dbname}" SET work_mem = \'77kB\'')
    assert _settings(dsns["clustering"])[:2] == ("4711ms", "77kB")   # not what it started with

    monkeypatch.setenv(roles.ADMIN_DSN_VARIABLE, database)
    for service, dsn in dsns.items():
        monkeypatch.setenv(roles.service_dsn_variable(service), dsn)
    assert cli.main(["db", "provision-roles"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _settings(dsns["clustering"]) == before
    assert before[2] == "hearth_clustering"
    assert report["clustering"]["settings_reset"] == [f"in database {dbname}: work_mem=77kB",
                                                      "statement_timeout=4711"]
    assert {s: r["settings_reset"] for s, r in report.items() if s != "clustering"} == {
        s: [] for s in roles.SERVICES if s != "clustering"}
