"""Devices of a household through the real mesh: the household read lists the devices of
the page's sessions (not every device whatever the page: attack25, docs/security.md), and
ingest refuses a batch that would take a household past its device bound, whole."""

from __future__ import annotations

import time

import httpx
import pytest
from tests.helpers.timestamps import iso_utc as _iso

DEVICES = 300


def _one_event_per_device(account: str, n: int, start: float) -> list[dict]:
    # Each device watches once, an hour after the previous: one closed session per device.
    return [{"event_id": f"{account}-{i}", "account_id": account, "device_id": f"dev-{i:04d}",
             "device_type": "mobile", "ts": _iso(start + i * 3600), "kind": "heartbeat",
             "title_id": "t-1", "genres": ["drama"], "duration_s": 300} for i in range(n)]


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        yield c


def test_household_page_lists_the_devices_of_its_sessions(client):
    account = "e2e-many-devices"
    start = time.time() - 20 * 86400
    stored = client.post("/v1/events", json={"events": _one_event_per_device(account, DEVICES, start)})
    assert stored.status_code == 200, stored.text
    assert stored.json()["accepted"] == DEVICES

    page = client.get(f"/v1/household/{account}", params={"limit": 5}).json()
    assert len(page["sessions"]) == 5
    assert {d["device_id"] for d in page["devices"]} == {s["device_id"] for s in page["sessions"]}
    assert page["total_devices"] == DEVICES
    assert all(d["session_count"] == 1 for d in page["devices"])

    # Paging through the sessions lists every device once.
    seen: list[str] = []
    cursor = ""
    while True:
        page = client.get(f"/v1/household/{account}", params={"limit": 100, "cursor": cursor}).json()
        assert len(page["devices"]) <= 100
        seen += [d["device_id"] for d in page["devices"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == [f"dev-{i:04d}" for i in range(DEVICES)]


def test_a_batch_past_the_device_bound_is_refused_whole(client, mesh):
    # The mesh runs with the default bound (HEARTH_MAX_DEVICES_PER_HOUSEHOLD=1000).
    account = "e2e-device-bound"
    events = _one_event_per_device(account, 1001, time.time() - 60 * 86400)
    refused = client.post("/v1/events", json={"events": events})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == "events[1000].device_id"
    assert client.get(f"/v1/household/{account}").status_code == 404  # nothing of the batch stored

    assert client.post("/v1/events", json={"events": events[:1000]}).json()["accepted"] == 1000
    one_more = client.post("/v1/events", json={"events": events[1000:]})
    assert one_more.status_code == 422
    assert one_more.json()["error"]["field"] == "events[0].device_id"
    # A device the household already has is still welcome.
    again = dict(events[999], event_id=f"{account}-again")
    assert client.post("/v1/events", json={"events": [again]}).status_code == 200
