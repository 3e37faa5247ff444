"""Each service logs in with the password `hearth db provision-roles` set for it, over TCP,
on a PostgreSQL that checks it (SCRAM-SHA-256), and a wrong or missing password is refused.

The session's cluster (and initdb's default pg_hba.conf) trusts every local login, so
there a role's password is never checked: a verifier computed wrong (review28's
client-side hashing, d9af784: another algorithm, another password, a broken encoding)
would pass every other test and make every service fail to log in in production. A small
cluster of its own, whose pg_hba.conf asks the service roles for their passwords as a
production server does (only the fixtures' superuser ``hearth`` is trusted: it is the
admin here and connects without one)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from services.common.storage import roles
from services.common.storage.sql import PostgresDatabase
from tests.helpers.servers import running_postgres
from tests.helpers.waiting import SLOW_MACHINE_S

SCRAM_HBA = ("local all all trust\n"
             "host all hearth 127.0.0.1/32 trust\n"
             "host all all 127.0.0.1/32 scram-sha-256\n")


@pytest.fixture(scope="module")
def scram_server():
    # Every statement logged (to data_dir/log/postgres.log): what provisioning sends is checked.
    with running_postgres(pg_hba=SCRAM_HBA, logging_collector="on", log_filename="postgres.log",
                          log_statement="all") as server:
        yield server


@pytest.fixture
def scram_cluster(scram_server):
    return scram_server.dsn


def logins(admin_dsn: str, passwords: dict[str, str]) -> dict[str, str]:
    return {s: make_conninfo(admin_dsn, user=f"scr_{s}", password=passwords[s]) for s in roles.SERVICES}


def login_as(dsn: str) -> tuple[str, bool]:
    """Who the server says we are, and whether the connection is TCP (not the socket)."""
    assert conninfo_to_dict(dsn)["host"] == "127.0.0.1"
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return conn.execute("SELECT current_user::text, inet_client_addr() IS NOT NULL").fetchone()


def test_each_service_logs_in_with_its_password_and_no_other(scram_cluster):
    # Quotes, a space and a non-ASCII letter: SCRAM's SASLprep and the DSN's quoting.
    passwords = {s: f"pw {s} 'ü\"$-1" for s in roles.SERVICES}
    dsns = logins(scram_cluster, passwords)
    roles.provision_roles(scram_cluster, dsns)
    for service, dsn in dsns.items():
        assert login_as(dsn) == (f"scr_{service}", True), service
        # The way the service itself connects (its pool; it starts: it may use its schema).
        PostgresDatabase(dsn, roles.schema_of(service), max_size=1).close()
    clustering = dsns["clustering"]
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "scr_clustering"'):
        login_as(make_conninfo(clustering, password="pw clustering"))
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "scr_clustering"'):
        login_as(make_conninfo(clustering, password=passwords["privacy"]))   # another service's
    with pytest.raises(psycopg.OperationalError, match="no password supplied|password authentication failed"):
        login_as(make_conninfo(clustering, password=""))

    # A re-run with a new password (rotating a service's Secret): the old one stops working.
    rotated = {**passwords, "clustering": "rotated-pw"}
    roles.provision_roles(scram_cluster, logins(scram_cluster, rotated))
    assert login_as(make_conninfo(clustering, password="rotated-pw")) == ("scr_clustering", True)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login_as(clustering)
    assert login_as(dsns["privacy"]) == ("scr_privacy", True)


def test_a_service_role_opens_no_more_connections_than_its_limit(scram_cluster, monkeypatch):
    """A compromised service could otherwise open connections until the server's
    max_connections and lock every other service out (docs/security.md)."""
    dsns = logins(scram_cluster, {s: f"pw-{s}" for s in roles.SERVICES})
    monkeypatch.delenv(roles.POOL_MAX_VARIABLE, raising=False)
    report = roles.provision_roles(scram_cluster, dsns)
    assert {r["connection_limit"] for r in report.values()} == {8 * roles.REPLICA_ALLOWANCE + 2}   # the default
    monkeypatch.setenv(roles.POOL_MAX_VARIABLE, "6")
    assert roles.default_connection_limit() == 6 * roles.REPLICA_ALLOWANCE + 2
    with psycopg.connect(scram_cluster) as conn:
        limits = dict(conn.execute("SELECT rolname::text, rolconnlimit FROM pg_roles WHERE rolname LIKE 'scr%'")
                      .fetchall())
    assert limits == {f"scr_{s}": 130 for s in roles.SERVICES}

    roles.provision_roles(scram_cluster, dsns, connection_limit=2)
    held = [psycopg.connect(dsns["clustering"]) for _ in range(2)]
    try:
        with pytest.raises(psycopg.OperationalError, match='too many connections for role "scr_clustering"'):
            psycopg.connect(dsns["clustering"]).close()
        assert login_as(dsns["privacy"]) == ("scr_privacy", True)      # the others still connect
    finally:
        for conn in held:
            conn.close()
    with pytest.raises(ValueError, match="--connection-limit 0: at least 1"):
        roles.provision_roles(scram_cluster, dsns, connection_limit=0)
    roles.provision_roles(scram_cluster, dsns, connection_limit=-1)   # no limit: PostgreSQL's default
    with psycopg.connect(scram_cluster) as conn:
        assert conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'scr_clustering'").fetchone() == (-1,)


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier (``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey``)
    is the one of ``password`` (RFC 5802 / 7677)."""
    method, params, keys = verifier.split("$")
    iterations, salt = params.split(":")
    stored_key, server_key = keys.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return (method == "SCRAM-SHA-256"
            and base64.b64decode(stored_key) == hashlib.sha256(client_key).digest()
            and base64.b64decode(server_key) == hmac.new(salted, b"Server Key", hashlib.sha256).digest())


def test_provisioning_sends_no_service_password_in_clear(scram_server):
    """Review28: `ALTER ROLE ... PASSWORD 'plaintext'` is written whole to the server's log
    under `log_statement = ddl` (or `all`) and kept by pg_stat_statements, so every
    service's database password ended up in a file the DBAs and the log pipeline read. The
    command hashes it (libpq's PQencryptPasswordConn) and sends only the verifier."""
    passwords = {s: f"pw-review28-{s}-secret" for s in roles.SERVICES}
    dsns = {s: make_conninfo(scram_server.dsn, user=f"pwr_{s}", password=passwords[s]) for s in roles.SERVICES}
    roles.provision_roles(scram_server.dsn, dsns)
    with psycopg.connect(scram_server.dsn) as conn:
        stored = dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname LIKE 'pwr%'").fetchall())
    log_file = scram_server.data_dir / "log" / "postgres.log"
    deadline = time.monotonic() + SLOW_MACHINE_S
    while "pg_authid" not in (logged := log_file.read_text(errors="replace")):   # the collector's pipe
        assert time.monotonic() < deadline, logged[-2000:]
        time.sleep(0.1)
    assert 'ALTER ROLE "pwr_clustering" PASSWORD' in logged
    for service, password in passwords.items():
        assert password not in logged, f"{service}'s password is in the server's log"
        assert _scram_matches(stored[f"pwr_{service}"], password), service


def _command_lines_while(work) -> list[str]:
    """Every command line of this machine's processes seen while ``work()`` runs (sampled)."""
    import threading
    from pathlib import Path

    seen: set[str] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    seen.add((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
            done.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return sorted(seen)


def test_a_backup_passes_no_password_on_a_command_line(scram_server, tmp_path):
    """Review28: `hearth backup` ran pg_dump with each service's DSN, password included, as an
    argument — readable by every user of the machine (`ps`, /proc/<pid>/cmdline) while the
    dump runs. The password goes in pg_dump's environment (PGPASSWORD, its owner's only),
    and the dump still logs in as the schema's owner on a server that checks it."""
    from services.common import backup

    passwords = {s: f"pw-backup28-{s}-secret" for s in roles.SERVICES}
    dsns = {s: make_conninfo(scram_server.dsn, user=f"bkp_{s}", password=passwords[s]) for s in roles.SERVICES}
    roles.provision_roles(scram_server.dsn, dsns)
    for service, dsn in dsns.items():   # each schema made and owned by its service (its migrations)
        PostgresDatabase(dsn, roles.schema_of(service), max_size=1).close()
    snapshots: list = []
    lines = _command_lines_while(lambda: snapshots.append(backup.backup_postgres(
        scram_server.dsn, tmp_path / "backups", dsns=dsns)))
    assert sorted(snapshots[0].files) == sorted(roles.SERVICES)
    # This test's dumps only (other suites on the machine run their own).
    dumps = [line for line in lines if "pg_dump" in line and "bkp_" in line and str(scram_server.port) in line]
    assert dumps, "no pg_dump seen: the sampling missed them"
    assert [line for line in dumps if any(p in line for p in passwords.values())] == []


def test_a_login_the_server_does_not_know_stops_the_service_naming_the_fix(scram_cluster, postgres16_dsn):
    """A service whose server was not provisioned (privacy's database on another server,
    session 30's drill) stopped at start with a psycopg traceback. Under SCRAM the server
    answers an unknown role as a failed password; under trust, that it does not exist."""
    from services.common.config import ConfigError

    unknown = make_conninfo(scram_cluster, user="scr_nobody", password="pw-nobody")
    with pytest.raises(ConfigError, match="refused role scr_nobody's password: the role does not exist there, or "
                                          "its password is not this DSN's: run `hearth db provision-roles`") as err:
        PostgresDatabase(unknown, "hearth_privacy", max_size=1)
    assert "pw-nobody" not in str(err.value)
    with pytest.raises(ConfigError, match="role scr_nobody does not exist on the server it names: run `hearth db "
                                          "provision-roles` .* `--service <name>`"):
        PostgresDatabase(make_conninfo(postgres16_dsn, user="scr_nobody"), "hearth_privacy", max_size=1)
