"""The restore drill when the privacy database itself is lost, through real processes:
the deletion ledger exported off-site (`hearth ledger export`) after a deletion made
after the snapshot is what keeps that household deleted. Without any ledger the restore
is refused, never silently resurrecting it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from services.privacy.keys.signing import key_id, load_public_key
from services.testing.mesh import ROOT, Mesh, write_api_key
from tests.e2e.test_restore_drill import DAY, _event_count, _events, _hearth, _rows
from tests.helpers.waiting import deletion_job


def _hearth_fails(mesh: Mesh, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=mesh.env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


def test_offsite_ledger_keeps_later_deletions_deleted_after_losing_the_privacy_database(tmp_path):
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
    mesh.data_dir.mkdir(parents=True)
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "drill-admin", "admin")
    backups, offsite = tmp_path / "backups", tmp_path / "offsite"
    t0 = time.time() - 3 * DAY
    try:
        mesh.start_healthy(120)
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=30) as client:
            for account in ("ledger-keep", "ledger-gone"):
                assert client.post("/v1/events", json={"events": _events(account, t0, 6)}).status_code == 200
            # A genuine export from before the snapshot: what an off-site bucket's older
            # version (or a copy that stopped syncing) holds (review32 R19).
            _hearth(mesh, "ledger", "export", "--out", str(offsite / "older.json"))
            snapshot = _hearth(mesh, "backup", "--out", str(backups))
            r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": "ledger-gone"},
                                                "reason": "gdpr_art17"})
            assert r.status_code == 202, r.text
            deleted_job = r.json()["job_id"]
            assert deletion_job(client, deleted_job)["state"] == "completed"
            # The off-site export, as the chart's CronJob writes it while the mesh runs.
            exported = _hearth(mesh, "ledger", "export", "--out", str(offsite / "deletion-ledger.json"))
            assert exported["jobs"] >= 1 and exported["shredded_accounts"] >= 1
        # ledger33: signed with the ledger's own (development) key, not the receipt key the
        # privacy service signs receipts with (before: the receipt key).
        published = {name: key_id(load_public_key((mesh.data_dir / f"privacy-{name}-signing.pub").read_text()))
                     for name in ("ledger", "receipt")}
        assert exported["key_id"] == published["ledger"] != published["receipt"], published
        mesh.stop()
        ledger_file = offsite / "deletion-ledger.json"
        assert oct(ledger_file.stat().st_mode & 0o777) == "0o600"
        assert deleted_job in {e["id"] for e in json.loads(ledger_file.read_text())["entries"]}

        # The node is lost together with the privacy database (and its WAL).
        for suffix in ("", "-wal", "-shm"):
            (mesh.data_dir / f"privacy.db{suffix}").unlink(missing_ok=True)
        # No ledger anywhere: refused, naming the way out.
        assert "--ledger" in _hearth_fails(mesh, "restore", snapshot["snapshot"])
        # A tampered copy is refused too, naming the entry: its last (a shredded key) dropped.
        tampered = offsite / "tampered.json"
        document = json.loads(ledger_file.read_text())
        dropped = document["entries"].pop()
        tampered.write_text(json.dumps(document))
        refused = _hearth_fails(mesh, "restore", snapshot["snapshot"], "--ledger", str(tampered))
        assert f"truncated: the head signs {dropped['n'] + 1} entries" in refused, refused
        assert not (mesh.data_dir / "privacy.db").exists()
        # A genuine but stale copy (exported before the snapshot) is refused: it knows nothing
        # of the deletion made after the snapshot (before: restored, exit 0, ledger-gone back).
        refused = _hearth_fails(mesh, "restore", snapshot["snapshot"], "--ledger", str(offsite / "older.json"))
        assert "stale: exported at" in refused and "before the snapshot" in refused, refused
        assert "--accept-stale-ledger" in refused
        assert not (mesh.data_dir / "privacy.db").exists()

        report = _hearth(mesh, "restore", snapshot["snapshot"], "--ledger", str(ledger_file))
        assert report["ledger_sources"] == [str(ledger_file)]
        (covered,) = report["ledger_coverage"]
        assert covered["jobs"] == exported["jobs"] and covered["signed_with"].startswith("ledger key (")
        assert [j["replaces"] for j in report["requeued_jobs"]] == [deleted_job]
        assert report["keys_tombstoned"] >= 1
        keys = _rows(mesh.data_dir / "privacy.db", "SELECT wrapped, destroyed_at FROM data_keys WHERE account_id = ?",
                     ("ledger-gone",))
        assert keys and all(bytes(w) == b"" and d for w, d in keys)

        mesh.start_healthy(120)
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=30) as client:
            (requeued,) = report["requeued_jobs"]
            job = deletion_job(client, requeued["job_id"])
            assert job["state"] == "completed", job
            assert client.get("/v1/household/ledger-gone").status_code == 404
            assert _event_count(client, "ledger-keep") == 6
    finally:
        mesh.stop()
