"""`hearth db provision-roles` sets each service role's password without sending it in
clear (review28): `ALTER ROLE ... PASSWORD 'plaintext'` is written whole to the server's
log under `log_statement = ddl` (or `all`, or `log_min_duration_statement`) and kept by
pg_stat_statements, so every service's database password ended up in a file the DBAs and
the log pipeline read. The password is hashed on the client (libpq's
PQencryptPasswordConn, the server's `password_encryption`) and only the verifier is sent.

A cluster of its own: the session's logs to /dev/null, and this needs the log."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import psycopg
from psycopg.conninfo import make_conninfo

from services.common.storage import roles
from tests.helpers.servers import running_postgres
from tests.helpers.waiting import SLOW_MACHINE_S


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


def test_provisioning_sends_no_service_password_in_clear():
    with running_postgres(logging_collector="on", log_filename="postgres.log", log_statement="all") as server:
        passwords = {s: f"pw-review28-{s}-secret" for s in roles.SERVICES}
        dsns = {s: make_conninfo(server.dsn, user=f"pwr_{s}", password=passwords[s]) for s in roles.SERVICES}
        roles.provision_roles(server.dsn, dsns)
        with psycopg.connect(server.dsn) as conn:
            stored = dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname LIKE 'pwr%'")
                          .fetchall())
        log_file = server.data_dir / "log" / "postgres.log"
        deadline = time.monotonic() + SLOW_MACHINE_S
        while "pg_authid" not in (logged := log_file.read_text(errors="replace")):   # the collector's pipe
            assert time.monotonic() < deadline, logged[-2000:]
            time.sleep(0.1)
    assert "ALTER ROLE" in logged
    for service, password in passwords.items():
        assert password not in logged, f"{service}'s password is in the server's log"
        assert _scram_matches(stored[f"pwr_{service}"], password), service
