"""A PostgreSQL DSN that does not parse is refused naming its variable, never echoing
the password (attack29).

libpq's parser quotes the token it could not read: a password holding a ``%`` that is
not a percent escape (``invalid percent-encoded token: "Xy7%qq..."``) came out whole,
one holding a space (keyword form) from the space on — in the traceback a service
printed at start (its pod's log, shipped to the log store), in `hearth backup`'s and
`hearth db provision-roles`' error (the hook Job's log, kept when it fails). Each runs
here in a process of its own, as deployed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.testing.mesh import ROOT

PASSWORD_PART = "SECRETpw4"
BAD_DSNS = {
    "percent": f"postgresql://hearth_clustering:Xy7%qq{PASSWORD_PART}@127.0.0.1:5/hearth",
    "space": f"user=hearth_clustering password=abc {PASSWORD_PART} host=127.0.0.1 dbname=hearth",
    "quote": f"user=hearth_clustering password='abc{PASSWORD_PART} host=127.0.0.1",
}


def _run(tmp_path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HEARTH_DATA_DIR": str(tmp_path), **env})


@pytest.mark.parametrize("case", sorted(BAD_DSNS))
def test_a_service_with_an_unparsable_dsn_names_the_variable_not_the_password(tmp_path, case):
    done = _run(tmp_path, ["-m", "services.feedback"],
                {"HEARTH_STORAGE": "postgres", "HEARTH_POSTGRES_DSN": BAD_DSNS[case],
                 "HEARTH_GRPC_PORT": "0", "HEARTH_METRICS_PORT": "0"})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert PASSWORD_PART not in output
    assert "HEARTH_POSTGRES_DSN" in output


@pytest.mark.parametrize("command", ["backup", "provision-roles"])
def test_the_tools_with_an_unparsable_dsn_name_the_variable_not_the_password(tmp_path, command):
    bad = BAD_DSNS["percent"]
    if command == "backup":
        args, env = ["backup", "--out", str(tmp_path / "bk")], {"HEARTH_STORAGE": "postgres",
                                                                 "HEARTH_POSTGRES_DSN": bad}
        variable = "HEARTH_POSTGRES_DSN"
    else:
        args = ["db", "provision-roles"]
        env = {"HEARTH_POSTGRES_ADMIN_DSN": "postgresql://postgres@127.0.0.1:5/hearth",
               **{f"HEARTH_POSTGRES_DSN_{s}": bad.replace("hearth_clustering", f"hearth_{s.lower()}")
                  for s in ("CLUSTERING", "ATTRIBUTION", "PRIVACY", "FEEDBACK")}}
        variable = "HEARTH_POSTGRES_DSN_"
    done = _run(tmp_path, ["-m", "services.cli", *args], env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert PASSWORD_PART not in output
    assert variable in output
    assert "Traceback" not in output
