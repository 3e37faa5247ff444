"""Retention at ingest through real processes (docs/privacy.md §7): with the retention
purge on, `POST /v1/events` refuses an event already older than `HEARTH_RETENTION_DAYS`
and counts it `rejected_expired`, instead of accepting it for the purge to erase seconds
later; a recent event of the same request is stored and stays."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from services.testing.mesh import running_mesh

DAY = 86400.0


@pytest.fixture(scope="module")
def rmesh(tmp_path_factory):
    # The purge on (privacy checks at once when it starts), retention 90 days: the same
    # two values reach clustering and privacy, as the chart's shared ConfigMap gives them.
    env = {"HEARTH_RETENTION_CHECK_S": "3600", "HEARTH_RETENTION_DAYS": "90"}
    with running_mesh(tmp_path_factory.mktemp("retention-ingest"), {"olivia": "admin"}, timeout_s=120,
                      extra_env=env) as m:
        yield m


def _event(account: str, i: int, ts: float) -> dict:
    return {"event_id": f"{account}-e{i}", "account_id": account, "device_id": "tv-1", "device_type": "tv",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)), "kind": "heartbeat",
            "title_id": f"title-{i}", "series_id": "show-1", "genres": ["drama"], "duration_s": 300,
            "maturity": "adult"}


def test_event_older_than_retention_is_rejected_expired_and_a_recent_one_stays(rmesh):
    account = f"ret-{uuid.uuid4().hex[:8]}"
    now = time.time()
    old, recent = _event(account, 1, now - 100 * DAY), _event(account, 2, now - 2 * DAY)
    with httpx.Client(base_url=rmesh.url, headers={"X-API-Key": rmesh.api_key}, timeout=30) as client:
        r = client.post("/v1/events", json={"events": [old, recent]})
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 1, "duplicates": 0, "rejected_late": 0, "sessions_touched": 1,
                            "rejected_expired": 1}
        household = client.get(f"/v1/household/{account}")
        assert household.status_code == 200, household.text
        sessions = household.json()["sessions"]
        assert sum(s["event_count"] for s in sessions) == 1
        # A request made only of expired events stores nothing: the client is told, and
        # no household appears (and none vanishes later).
        lone = f"ret-{uuid.uuid4().hex[:8]}"
        r = client.post("/v1/events", json={"events": [_event(lone, 1, now - 100 * DAY)]})
        assert r.status_code == 200, r.text
        assert (r.json()["accepted"], r.json()["rejected_expired"]) == (0, 1)
        assert client.get(f"/v1/household/{lone}").status_code == 404
        openapi = client.get("/openapi.json")
        assert openapi.status_code == 200, openapi.text
        assert "rejected_expired" in openapi.json()["components"]["schemas"]["IngestOut"]["properties"]


def test_touchpoints_and_conversions_older_than_retention_are_rejected_expired(rmesh):
    """chaos23: attribution accepted a touchpoint or conversion far older than the window
    (`{"accepted": 2}` for one 200 days old and one recent) and kept it until the next check
    erased it, with no sign to the client. Now it refuses it as clustering does events."""
    account = f"ret-{uuid.uuid4().hex[:8]}"
    now = time.time()
    iso = lambda ts: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))   # noqa: E731
    with httpx.Client(base_url=rmesh.url, headers={"X-API-Key": rmesh.api_key}, timeout=30) as client:
        r = client.post("/v1/touchpoints", json={"touchpoints": [
            {"touchpoint_id": f"{account}-{i}", "account_id": account, "device_id": "tv-1", "ts": iso(ts),
             "channel": "email", "campaign": "c"} for i, ts in enumerate((now - 200 * DAY, now - DAY))]})
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 1, "duplicates": 0, "rejected_expired": 1}
        r = client.post("/v1/conversions", json={"conversions": [
            {"conversion_id": f"{account}-c", "account_id": account, "ts": iso(now - 200 * DAY), "kind": "purchase",
             "value": 1.0}]})
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 0, "duplicates": 0, "rejected_expired": 1}
        held = client.get(f"/v1/household/{account}/export").json()["services"]["attribution"]
        assert [t["touchpoint_id"] for t in held["touchpoints"]] == [f"{account}-1"] and held["conversions"] == []
