"""The restore drill, through real processes: snapshot a running mesh (`hearth backup`,
SQLite online backup), keep writing, delete a household *after* the snapshot, lose the
node, restore the snapshot (`hearth restore`) and start the mesh again.

Proves that the household deleted after the snapshot stays deleted (its data key is a
tombstone in the restored database before any service starts, and the re-queued job
erases it in every service again), that data written before the snapshot is back, and
measures RPO (writes lost: everything after the snapshot) and RTO (restore + start until
the gateway is healthy). The figures are printed as JSON; docs/operations.md states them."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import httpx

from services.testing.mesh import ROOT, Mesh, write_api_key
from tests.helpers.waiting import SLOW_MACHINE_S, deletion_job

DAY = 86400.0


def _events(account: str, start: float, n: int, first: int = 0) -> list[dict]:
    return [{"event_id": f"{account}-{first + i}", "account_id": account, "device_id": "tv-1",
             "device_type": "tv", "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + i * 300)),
             "kind": "heartbeat", "title_id": f"t-{i}",
             "series_id": "s", "genres": ["drama"], "duration_s": 300, "maturity": "adult"}
            for i in range(n)]


def _hearth(mesh: Mesh, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=mesh.env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rows(db_path, sql: str, params=()) -> list[tuple]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql, params).fetchall()


def _event_count(client: httpx.Client, account: str) -> int:
    r = client.get(f"/v1/household/{account}")
    return sum(s["event_count"] for s in r.json()["sessions"]) if r.status_code == 200 else -r.status_code


def test_restore_drill_keeps_later_deletions_deleted_and_measures_rpo_rto(tmp_path):
    mesh = Mesh.on_free_ports(tmp_path / "var", log_dir=tmp_path / "logs")
    mesh.data_dir.mkdir(parents=True)
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "drill-admin", "admin")
    backups = tmp_path / "backups"
    t0 = time.time() - 3 * DAY
    try:
        mesh.start_healthy(120)
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=30) as client:
            for account in ("drill-keep", "drill-gone"):
                assert client.post("/v1/events", json={"events": _events(account, t0, 6)}).status_code == 200
            assert _event_count(client, "drill-keep") == 6

            snapshot = _hearth(mesh, "backup", "--out", str(backups), "--keep", "3")
            assert snapshot["backend"] == "sqlite" and set(snapshot["services"]) == {
                "clustering", "attribution", "privacy", "feedback"}

            # After the snapshot: more writes (lost by the restore: the RPO) and a deletion
            # (must survive the restore).
            later = _events("drill-keep", t0 + DAY, 4, first=100)
            assert client.post("/v1/events", json={"events": later}).status_code == 200
            assert _event_count(client, "drill-keep") == 10
            r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": "drill-gone"},
                                                "reason": "gdpr_art17"})
            assert r.status_code == 202
            deleted_job = r.json()["job_id"]
            deadline = time.monotonic() + SLOW_MACHINE_S
            while client.get(f"/v1/delete/{deleted_job}").json()["state"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert client.get("/v1/household/drill-gone").status_code == 404
        failed_at = time.time()
        mesh.stop()

        privacy_db = mesh.data_dir / "privacy.db"
        snap_dir = snapshot["snapshot"]
        # The snapshot itself still holds the household's live data key (that is the risk).
        assert _rows(f"{snap_dir}/privacy.db", "SELECT COUNT(*) FROM data_keys WHERE account_id = ? "
                     "AND destroyed_at IS NULL AND length(wrapped) > 0", ("drill-gone",))[0][0] >= 1

        started = time.monotonic()
        report = _hearth(mesh, "restore", snap_dir)
        restore_s = time.monotonic() - started
        assert [j["replaces"] for j in report["requeued_jobs"]] == [deleted_job]
        assert report["keys_tombstoned"] >= 1
        # Before any service starts, the restored key of the deleted household is a
        # tombstone again: its encrypted data cannot be read.
        keys = _rows(privacy_db, "SELECT wrapped, destroyed_at FROM data_keys WHERE account_id = ?", ("drill-gone",))
        assert keys and all(bytes(w) == b"" and d for w, d in keys)

        mesh.start_healthy(120)
        rto_s = time.monotonic() - started
        with httpx.Client(base_url=mesh.url, headers={"X-API-Key": key}, timeout=30) as client:
            (requeued,) = report["requeued_jobs"]
            job = deletion_job(client, requeued["job_id"])
            assert job["state"] == "completed", job
            assert client.get("/v1/household/drill-gone").status_code == 404
            # Data from before the snapshot is back; what was written after it is the RPO.
            assert _event_count(client, "drill-keep") == 6
        clustering_db = mesh.data_dir / "clustering.db"
        tables = [r[0] for r in _rows(clustering_db, "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [c[1] for c in _rows(clustering_db, f"PRAGMA table_info({table})")]
            if "account_id" in columns:
                assert _rows(clustering_db, f"SELECT COUNT(*) FROM {table} WHERE account_id = ?",
                             ("drill-gone",))[0][0] == 0, table
        rpo_s = failed_at - snapshot["taken_at"]
        print(json.dumps({"drill": "sqlite", "rpo_s": round(rpo_s, 2), "restore_s": round(restore_s, 2),
                          "rto_s": round(rto_s, 2)}))
        assert rto_s < 120
    finally:
        mesh.stop()
