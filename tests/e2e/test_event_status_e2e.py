"""POST /v1/events/status through real processes: which of a household's event ids are
stored, erased or not stored — what a caller whose POST /v1/events answered 504 asks
before resending (docs/features.md, "Was my batch stored?")."""

from __future__ import annotations

import time

import httpx
import pytest

from services.testing.mesh import write_api_key
from tests.helpers.waiting import deletion_job

ACCT = "e2e-status-acc"


def _event(event_id: str, device: str, ts: float) -> dict:
    return {"event_id": event_id, "account_id": ACCT, "device_id": device, "device_type": "tv",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)), "kind": "heartbeat", "title_id": "t-1",
            "genres": ["drama"], "duration_s": 300}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        yield c


def test_a_batchs_event_ids_come_back_stored_erased_or_not_stored(client, mesh):
    start = time.time() - 2 * 86400
    stored = [_event(f"{ACCT}-tv-{i}", "tv-1", start + 300 * i) for i in range(3)]
    gone = [_event(f"{ACCT}-tab-{i}", "tab-1", start + 300 * i) for i in range(2)]
    assert client.post("/v1/events", json={"events": stored + gone}).status_code == 200
    # The tablet's events are erased (a device deletion): a resend of them would be ignored
    # as duplicates, so they are not "not stored".
    job = client.post("/v1/delete", json={"scope": {"kind": "device", "account_id": ACCT, "device_id": "tab-1"},
                                          "reason": "e2e status"})
    assert job.status_code == 202, job.text
    assert deletion_job(client, job.json()["job_id"])["state"] == "completed"

    asked = [gone[1]["event_id"], f"{ACCT}-never", stored[2]["event_id"], stored[0]["event_id"],
             stored[0]["event_id"], gone[0]["event_id"]]
    r = client.post("/v1/events/status", json={"account_id": ACCT, "event_ids": asked})
    assert r.status_code == 200, r.text
    assert r.json() == {"account_id": ACCT, "stored": [stored[2]["event_id"], stored[0]["event_id"]],
                        "erased": [gone[1]["event_id"], gone[0]["event_id"]], "not_stored": [f"{ACCT}-never"]}

    # "erased" is for whoever sends events (not to resend them): a data scientist, who
    # reads households but never ingests, is told them as never stored. Until attack28 it
    # learnt which of a household's events an erasure deleted (that a member had a device
    # erased), which its household view never shows.
    keys = mesh.data_dir / "gateway-keys.json"
    for role, erased in (("service", [gone[1]["event_id"], gone[0]["event_id"]]), ("data_scientist", [])):
        as_role = httpx.post(f"{mesh.url}/v1/events/status", json={"account_id": ACCT, "event_ids": asked},
                             headers={"X-API-Key": write_api_key(keys, f"e2e-status-erased-{role}", role)}, timeout=30)
        assert as_role.status_code == 200, as_role.text
        assert as_role.json()["erased"] == erased, (role, as_role.text)
        assert as_role.json()["stored"] == [stored[2]["event_id"], stored[0]["event_id"]], (role, as_role.text)
        assert [i for i in asked if i not in as_role.json()["stored"] + erased] == as_role.json()["not_stored"]

    # Another household's ids are its own: none of these is stored there.
    other = client.post("/v1/events/status", json={"account_id": f"{ACCT}-other", "event_ids": asked})
    assert other.status_code == 200, other.text
    assert other.json()["stored"] == [] and other.json()["not_stored"] == list(dict.fromkeys(asked))

    # What the answer says is what a resend does: the not-stored one is accepted, the rest
    # are duplicates.
    resent = client.post("/v1/events", json={"events": [*stored, *gone, _event(f"{ACCT}-never", "tv-1",
                                                                               start + 1200)]})
    assert resent.json()["accepted"] == 1 and resent.json()["duplicates"] == 5, resent.text


@pytest.mark.parametrize("body,field", [
    ({"event_ids": ["e-1"]}, "account_id"),
    ({"account_id": "a b", "event_ids": ["e-1"]}, "account_id"),
    ({"account_id": ACCT, "event_ids": []}, "event_ids"),
    ({"account_id": ACCT, "event_ids": ["e-1", "bad\x00id"]}, "event_ids[1]"),
    ({"account_id": ACCT, "event_ids": [f"e-{i}" for i in range(10_001)]}, "event_ids"),
    ({"account_id": ACCT, "event_ids": "e-1"}, "event_ids"),
    ({"account_id": ACCT, "event_ids": ["e-1"], "extra": 1}, "extra"),
])
def test_bad_status_requests_get_422_naming_the_field(client, body, field):
    r = client.post("/v1/events/status", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


def test_the_status_needs_the_permission_to_read_the_household(client, mesh):
    keys = mesh.data_dir / "gateway-keys.json"
    body = {"account_id": ACCT, "event_ids": [f"{ACCT}-tv-0"]}
    for role, status in (("analyst", 403), ("privacy_officer", 403), ("data_scientist", 200), ("service", 200)):
        key = write_api_key(keys, f"e2e-status-{role}", role)
        r = httpx.post(mesh.url + "/v1/events/status", json=body, headers={"X-API-Key": key}, timeout=30)
        assert r.status_code == status, (role, r.text)


def test_the_status_answers_while_a_long_write_holds_the_database(client, mesh):
    """The question is asked after a 504, and a 504 of POST /v1/events comes of a write that
    held clustering's database too long (a big household's Rekey, a batch of new households:
    docs/security.md, session 27). The status is a read: it must answer beside such a write,
    as GET /v1/household does (WAL), not queue for SQLite's one write lock behind it
    (review27: it read in a write transaction, BEGIN IMMEDIATE, and answered 504 after the
    gateway's deadline while the lock was held)."""
    import sqlite3

    start = time.time() - 2 * 86400
    assert client.post("/v1/events", json={"events": [_event(f"{ACCT}-lock-0", "tv-1", start)]}).status_code == 200
    writer = sqlite3.connect(mesh.data_dir / "clustering.db", timeout=10, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")   # the write lock, as a long Rekey or ingest holds it
        r = client.post("/v1/events/status", json={"account_id": ACCT,
                                                   "event_ids": [f"{ACCT}-lock-0", f"{ACCT}-lock-1"]})
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert r.status_code == 200, r.text
    assert (r.json()["stored"], r.json()["not_stored"]) == ([f"{ACCT}-lock-0"], [f"{ACCT}-lock-1"])
