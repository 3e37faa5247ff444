"""attack34: an erasure of one device (person, window) racing its household's erasure.

Person, device, window and household deletions of one account sent together: the household
job shreds the data key first (HOUSEHOLD_STAGES), then erases each store. A device job that
reached a store after the shred but before the household job's Erase there met the
household's data still stored and no key to keep the erased ids' digests under: the store
answered FAILED_PRECONDITION "data key destroyed", which a job does not retry — the job
ended `failed`, its later steps (feedback) never ran and no receipt was signed, with
nothing of the household left once the household job completed. Now the job runner
(services/privacy/deletion/app.py) answers such a step as done, `already_erased`: the
household's data there opens under no key and the household job erases its rows. Made
deterministic through real processes: clustering is stopped while the household job
reaches it, so that job waits out a long retry backoff, and the device job is asked for
once clustering is back.

review34 N6 (session 35): the device job's step there was then confirmed at once, its
receipt signed while the household job had yet to erase clustering's rows — whose account,
device and session ids and timestamps are stored in the clear. Now the step waits for the
household job to erase that service and only then is confirmed ``already_erased``: no
receipt claims an erasure before it happened. Session 36: meanwhile privacy's overdue age
shows the device job as waiting for its household's job, apart from the household job."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.testing.mesh import ROOT, running_mesh
from tests.helpers.timestamps import iso_utc as _iso
from tests.helpers.waiting import SLOW_MACHINE_S, deletion_job, household_erasure_held_at, wait_for

DAY = 86400.0
# The household job's next attempt at clustering, once clustering refused its first: long
# enough (the jitter takes up to a fifth off) for clustering's restart and the device job.
HOUSEHOLD_RETRY_S = 45.0


def _events(client: httpx.Client, acct: str, device: str, start: float, n: int) -> None:
    body = {"events": [{"event_id": f"{acct}-{device}-{i}", "account_id": acct, "device_id": device,
                        "device_type": "tv", "ts": _iso(start + i * 300), "kind": "heartbeat",
                        "title_id": f"title-{i}", "series_id": "show-1", "genres": ["drama"], "duration_s": 300,
                        "maturity": "adult", "country": "FR"} for i in range(n)]}
    r = client.post("/v1/events", json=body)
    assert r.status_code == 200, r.text


def test_a_device_erasure_reaching_a_store_after_its_households_key_was_shredded_completes(tmp_path):
    env = {"HEARTH_DELETION_POLL_S": "0.1", "HEARTH_DELETION_RETRY_BASE_S": str(HOUSEHOLD_RETRY_S),
           "HEARTH_DELETION_RETRY_MAX_S": str(HOUSEHOLD_RETRY_S), "HEARTH_DELETION_LEASE_S": "5",
           "HEARTH_RETENTION_CHECK_S": "0", "HEARTH_ERASURE_FENCE_S": "0.2"}
    acct = "race-hh"
    with running_mesh(tmp_path / "mesh", {"olivia": "admin"}, timeout_s=120, extra_env=env) as mesh, \
            httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        t0 = time.time() - 3 * DAY
        _events(client, acct, "tv-1", t0, 4)
        _events(client, acct, "ph-1", t0 + DAY, 3)
        # the key shredded, attribution erased, clustering refused once
        household_job = household_erasure_held_at(mesh, client, acct, "clustering")
        refused_at = time.monotonic()
        mesh.wait_healthy()
        # The household's data is still in clustering, its key gone: the device job gets there first.
        r = client.post("/v1/delete", json={"scope": {"kind": "device", "account_id": acct, "device_id": "tv-1"}})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]

        def waiting_or_done() -> dict | None:
            body = client.get(f"/v1/delete/{job_id}").json()
            step = next(s for s in body["services"] if s["service"] == "clustering")
            return body if body["state"] != "running" or household_job in step["last_error"] else None

        job = wait_for(waiting_or_done, what="the device job waiting for the household job, or finished")
        household = client.get(f"/v1/delete/{household_job}").json()
        assert household["state"] == "running", ("the household job erased clustering before the device job "
                                                 "got there: the race was not made", household)
        assert time.monotonic() - refused_at < HOUSEHOLD_RETRY_S * 0.8
        rows = _rows_of(mesh.data_dir, acct)
        assert any(k.startswith("clustering.") for k in rows), rows   # what the household job has still to erase
        # No receipt while clustering still holds the household's rows: the step waits, naming the job.
        assert job["state"] == "running" and job["receipt"] is None, job
        step = next(s for s in job["services"] if s["service"] == "clustering")
        assert not step["confirmed"] and "waiting for household job" in step["last_error"], step
        # Session 36: privacy's overdue age says what waits and what is stuck — the device job
        # in its own series (waiting="household_job"), the household job (asked for first) in
        # waiting="none", the one HearthDeletionJobOverdue reads.
        ages = _open_job_ages(mesh)
        assert set(ages) == {"none", "household_job"}, ages
        assert 0 < ages["household_job"] <= ages["none"], ages
        # The household job erases what clustering held and completes; then the device job does.
        household = deletion_job(client, household_job, timeout_s=HOUSEHOLD_RETRY_S + SLOW_MACHINE_S)
        assert household["state"] == "completed", household
        job = deletion_job(client, job_id)
        assert job["state"] == "completed", job
        by = {s["service"]: s for s in job["services"]}
        assert set(by) == {"attribution", "clustering", "feedback", "privacy"}, job
        assert all(s["confirmed"] for s in by.values()), job
        assert by["clustering"]["already_erased"] is True and not by["clustering"]["deleted_counts"], job
        assert _rows_of(mesh.data_dir, acct) == {}
        assert _open_job_ages(mesh) == {"none": 0.0, "household_job": 0.0}
        receipt = job["receipt"]
        assert receipt["receipt"]["scope"] == {"kind": "device", "account_id": acct, "device_id": "tv-1"}
        assert set(receipt["receipt"]["services"]) == set(by)
        path = tmp_path / "receipt.json"
        path.write_text(json.dumps(receipt))
        verified = subprocess.run([sys.executable, "-m", "services.privacy.cli", "verify-receipt", str(path),
                                   "--public-key", str(mesh.data_dir / "privacy-receipt-signing.pub")],
                                  cwd=ROOT, capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr


def _open_job_ages(mesh) -> dict[str, float]:
    """privacy's hearth_deletion_oldest_open_job_age_seconds, scraped: waiting label -> age."""
    text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports['privacy']}/metrics", timeout=10).text
    return {s.labels.get("waiting", ""): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "hearth_deletion_oldest_open_job_age_seconds"}


def _rows_of(data_dir, account: str) -> dict[str, int]:
    """Rows naming ``account`` in every table of every data-holding service's SQLite file."""
    found: dict[str, int] = {}
    for service in ("clustering", "attribution", "feedback"):
        conn = sqlite3.connect(data_dir / f"{service}.db")
        try:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                if "account_id" in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    n = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE account_id = ?", (account,)).fetchone()[0]
                    if n:
                        found[f"{service}.{table}"] = n
        finally:
            conn.close()
    return found


def test_a_device_erasure_whose_household_erasure_failed_before_erasing_a_store_gets_no_receipt(tmp_path):
    """The household job shredded the key and failed before erasing clustering (one attempt
    allowed, clustering stopped): clustering still holds the household's rows. A device
    erasure refused there FAILED_PRECONDITION is vouched for by no household job — it fails
    like any such refusal, and no receipt claims the device erased (review34 N6)."""
    env = {"HEARTH_DELETION_POLL_S": "0.1", "HEARTH_DELETION_MAX_ATTEMPTS": "1", "HEARTH_DELETION_LEASE_S": "5",
           "HEARTH_RETENTION_CHECK_S": "0", "HEARTH_ERASURE_FENCE_S": "0.2"}
    acct = "race-failed-hh"
    with running_mesh(tmp_path / "mesh", {"olivia": "admin"}, timeout_s=120, extra_env=env) as mesh, \
            httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        _events(client, acct, "tv-1", time.time() - 3 * DAY, 4)
        mesh.stop_process("clustering")
        try:
            r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": acct}})
            assert r.status_code == 202, r.text
            household = deletion_job(client, r.json()["job_id"])
        finally:
            mesh.start_service("clustering")
        assert household["state"] == "failed", household
        mesh.wait_healthy()
        assert any(k.startswith("clustering.") for k in _rows_of(mesh.data_dir, acct))
        r = client.post("/v1/delete", json={"scope": {"kind": "device", "account_id": acct, "device_id": "tv-1"}})
        assert r.status_code == 202, r.text
        job = deletion_job(client, r.json()["job_id"])
        assert job["state"] == "failed" and job["receipt"] is None, job
        step = next(s for s in job["services"] if s["service"] == "clustering")
        assert not step["confirmed"] and "FAILED_PRECONDITION" in step["last_error"], step
