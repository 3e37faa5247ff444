"""`hearth restore` on SQLite while the services run (attack26): it answered 0, replaced
the files under the running processes and removed their -wal; the services went on with
the unlinked files, so an event batch acknowledged after the restore was gone after the
next start (seen on `scripts/run.py`). Now it refuses, naming the services, and changes
nothing."""

from __future__ import annotations

import json
import subprocess
import sys

from services.testing.mesh import ROOT

SERVICES = ("attribution", "clustering", "feedback", "privacy")


def _hearth(mesh, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=mesh.env(),
                          capture_output=True, text=True, timeout=120)


def test_a_restore_is_refused_while_the_services_have_their_databases_open(mesh, tmp_path):
    backup = _hearth(mesh, "backup", "--out", str(tmp_path / "backups"))
    assert backup.returncode == 0, backup.stderr
    snapshot = json.loads(backup.stdout.strip().splitlines()[-1])["snapshot"]
    files = {s: mesh.data_dir / f"{s}.db" for s in SERVICES}
    before = {s: (path.stat().st_ino, path.stat().st_mtime_ns) for s, path in files.items()}
    wal_before = {s: path.with_name(path.name + "-wal").exists() for s, path in files.items()}

    done = _hearth(mesh, "restore", snapshot)

    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    for service in SERVICES:
        assert service in done.stderr, done.stderr
    assert "stop every service first" in done.stderr
    assert {s: path.stat().st_ino for s, path in files.items()} == {s: v[0] for s, v in before.items()}
    assert {s: path.with_name(path.name + "-wal").exists() for s, path in files.items()} == wal_before
