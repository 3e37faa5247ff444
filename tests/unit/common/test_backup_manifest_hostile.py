"""`hearth restore` of a snapshot whose manifest was written by someone else (attack31).

The manifest names each service and its file, and its SHA-256 proves only that the file
is the one the manifest names, not who wrote either. The service names were used as
paths: a manifest naming service ``/../../<dir>/x`` made `hearth restore` write the
snapshot's file to ``<dir>/x.db`` (outside the data directory) and answer "restored";
one naming ``../<dir>/victim`` first deleted ``<dir>/victim.db-wal``, ``-shm`` and
``-journal``; a file entry ``../..`` read a file outside the snapshot, and one that is a
symbolic link was followed. Now a manifest names only the mesh's services, each with a
plain file name inside the snapshot that is not a link, else nothing is touched and the
command says which entry is wrong in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import backup
from services.testing.mesh import ROOT

CONTENT = b"a snapshot's file, whatever it holds"


def _snapshot(root: Path, files: dict, *, link_to: Path | None = None) -> Path:
    snap = root / "snap"
    snap.mkdir()
    if link_to is not None:
        (snap / "x.db").symlink_to(link_to)
    else:
        (snap / "x.db").write_bytes(CONTENT)
    entries = {service: {"file": name, "sha256": hashlib.sha256(CONTENT).hexdigest(), "bytes": len(CONTENT)}
               for service, name in files.items()}
    (snap / backup.MANIFEST).write_text(json.dumps({"format": backup.FORMAT, "backend": "sqlite",
                                                    "taken_at": 1.0, "files": entries}))
    return snap


def _restore(snap: Path, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEARTH_DATA_DIR": str(data), "HEARTH_STORAGE": "sqlite"}
    return subprocess.run([sys.executable, "-m", "services.cli", "restore", str(snap), "--data-dir", str(data),
                           "--accept-no-ledger"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_manifest_naming_a_path_as_its_service_writes_nothing_outside_the_data_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.db-wal").write_text("kept")
    climb = "/.." * (len(tmp_path.parts) + 2)
    snap = _snapshot(tmp_path, {f"{climb}{outside}/escaped": "x.db", "../outside/victim": "x.db"})
    done = _restore(snap, tmp_path / "data")
    assert done.returncode != 0 and not done.stdout, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "not one of clustering" in done.stderr, done.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["victim.db-wal"]   # nothing written, nothing deleted


@pytest.mark.parametrize("name", ["../x.db", "/etc/hostname", "sub/x.db", "..", ""])
def test_a_file_entry_outside_the_snapshot_is_refused(tmp_path, name):
    snap = _snapshot(tmp_path, {"clustering": name})
    with pytest.raises(backup.BackupError, match="clustering"):
        backup.Snapshot.load(snap)


def test_a_snapshot_file_that_is_a_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere.db"
    target.write_bytes(CONTENT)   # the checksum matches: the link alone is the fault
    snap = _snapshot(tmp_path, {"clustering": "x.db"}, link_to=target)
    with pytest.raises(backup.BackupError, match="link"):
        backup.Snapshot.load(snap).verify()


@pytest.mark.parametrize("manifest", [
    {"format": backup.FORMAT, "backend": "sqlite", "taken_at": 1.0, "files": []},
    {"format": backup.FORMAT, "backend": "sqlite", "taken_at": 1.0, "files": {"clustering": "x.db"}},
    {"format": backup.FORMAT, "backend": "sqlite", "files": {}},
    {"format": backup.FORMAT, "backend": "oracle", "taken_at": 1.0, "files": {}},
    {"format": backup.FORMAT, "backend": "sqlite", "taken_at": "yesterday", "files": {}},
])
def test_a_malformed_manifest_is_a_backup_error_not_a_traceback(tmp_path, manifest):
    (tmp_path / backup.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(backup.BackupError):
        backup.Snapshot.load(tmp_path)


def test_pruning_leaves_a_link_named_like_a_snapshot_alone(tmp_path):
    """A link ``hearth-00000000`` (the oldest name) to a directory holding a manifest made
    `hearth backup --keep 1` fail with a traceback after its snapshot was taken (rmtree
    refuses links), and nothing older was pruned again."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / backup.MANIFEST).write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "hearth-00000000").symlink_to(elsewhere)
    old, new = out / "hearth-20260101T000000.000000Z", out / "hearth-20260102T000000.000000Z"
    for snap in (old, new):
        snap.mkdir()
        (snap / backup.MANIFEST).write_text("{}")
    assert backup.prune(out, keep=1) == [old]
    assert sorted(p.name for p in out.iterdir()) == ["hearth-00000000", new.name]
    assert (elsewhere / backup.MANIFEST).exists()


def test_a_link_planted_where_restore_writes_its_copy_is_not_followed(tmp_path):
    """attack31: `restore_sqlite` copied each database to ``.<service>.db.restoring`` in the
    data directory with shutil.copyfile, which follows a link: one planted there by
    anything that can write the data directory (a service's process on one host) made the
    restore overwrite the link's target with the snapshot's database, then rename the
    link into place as the service's database."""
    source = tmp_path / "source"
    source.mkdir()
    import sqlite3

    with sqlite3.connect(source / "clustering.db") as db:
        db.execute("CREATE TABLE t (x)")
    snapshot = backup.backup_sqlite(source, tmp_path / "out")
    data = tmp_path / "data"
    data.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the operator's file")
    (data / ".clustering.db.restoring").symlink_to(victim)
    assert backup.restore_sqlite(backup.Snapshot.load(snapshot.path), data) == ["clustering"]
    assert victim.read_text() == "the operator's file"
    restored = data / "clustering.db"
    assert restored.is_file() and not restored.is_symlink()
    assert restored.read_bytes() == (snapshot.path / "clustering.db").read_bytes()
