"""A snapshot is the owner's alone from its first byte (attack29).

`hearth backup` ran under the operator's umask (022 on most machines): the snapshot
directory was 0755 and each database copy was created 0644 and made 0600 only once
it was complete, so another local user could open a copy while it was being written
(seconds to minutes for a large schema) and read every household's data through the
open file afterwards. `hearth restore` created a missing data directory 0755 alike.
Here the command runs in a process of its own under umask 022, as an operator's shell
would start it."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from services.testing.mesh import ROOT


def _hearth(env_data_dir: Path, *args: str) -> dict:
    env = {**os.environ, "HEARTH_DATA_DIR": str(env_data_dir), "HEARTH_STORAGE": "sqlite"}
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _open_to_others(path: Path) -> list[str]:
    """``path`` and everything under it that group or others may read, write or enter."""
    found = []
    for p in [path, *sorted(path.rglob("*"))]:
        if stat.S_IMODE(p.stat().st_mode) & 0o077:
            found.append(f"{p.relative_to(path.parent)} {oct(stat.S_IMODE(p.stat().st_mode))}")
    return found


def test_a_snapshot_and_a_restored_data_dir_are_the_owners_only_under_umask_022(tmp_path):
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    with sqlite3.connect(data / "clustering.db") as conn:
        conn.execute("CREATE TABLE events (account_id TEXT)")
        conn.execute("INSERT INTO events VALUES ('zz-household-1')")
    os.chmod(data / "clustering.db", 0o600)

    out = tmp_path / "backups"
    snapshot = Path(_hearth(data, "backup", "--out", str(out))["snapshot"])
    assert _open_to_others(out) == []
    assert (snapshot / "clustering.db").is_file()

    restored = tmp_path / "restored" / "var"
    _hearth(restored, "restore", str(snapshot), "--accept-no-ledger")
    assert (restored / "clustering.db").is_file()
    assert _open_to_others(restored) == []
