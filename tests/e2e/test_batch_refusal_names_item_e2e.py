"""A batch refused for one household names the item that made it fail (attack29).

An ingest pipeline sends events, touchpoints and conversions of many households in one
request; one household erased (or withdrawn from processing) refuses the whole batch,
nothing stored — as it must. But the 412 named only `account_id`, and for an erased
household its message named no account ("the data key of this household was
destroyed"): the sender of 10,000 events could not tell which to drop and had to bisect.
Now the field is `events[i].account_id` (`touchpoints[i]`, `conversions[i]`) of the
first item of that household, as a bad item of a batch is named everywhere else."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.helpers.waiting import SLOW_MACHINE_S, deletion_job

RUN = uuid.uuid4().hex[:6]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _event(account: str, i: int, ts: float) -> dict:
    return {"event_id": f"{account}-{i}", "account_id": account, "device_id": "tv-1", "device_type": "tv",
            "ts": _iso(ts), "kind": "heartbeat", "duration_s": 60}


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        yield c


def _stored(client, account: str, event_ids: list[str]) -> list[str]:
    r = client.post("/v1/events/status", json={"account_id": account, "event_ids": event_ids})
    assert r.status_code == 200, r.text
    return r.json()["stored"]


def test_a_batch_refused_for_an_erased_or_withdrawn_household_names_that_households_first_item(client):
    live, gone, withdrawn = (f"bn-{kind}-{RUN}" for kind in ("live", "gone", "withdrawn"))
    t0 = time.time() - 86400
    assert client.post("/v1/events", json={"events": [_event(gone, 0, t0)]}).status_code == 200
    job = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": gone}})
    assert job.status_code == 202, job.text
    assert deletion_job(client, job.json()["job_id"])["state"] == "completed"
    assert client.put(f"/v1/consent/{withdrawn}", json={"processing": False, "attribution": False}).status_code == 200

    for other, index in ((gone, 2), (withdrawn, 1)):
        deadline = time.monotonic() + SLOW_MACHINE_S
        events = [_event(live, 1, t0), *([_event(other, 1, t0)] if index == 1 else [_event(live, 2, t0)]),
                  _event(other, 2, t0), _event(live, 3, t0)]
        while True:   # a service may have cached the account's consent for HEARTH_CONSENT_CACHE_S
            r = client.post("/v1/events", json={"events": events})
            if r.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 412, r.text
        assert r.json()["error"]["field"] == f"events[{index}].account_id", (other, r.text)
        # The two refusals say why, apart (docs/privacy.md §8, "An erased household's refusal
        # is told apart"): the writer's next step differs.
        message = r.json()["error"]["message"]
        if other == gone:
            assert "the household was erased" in message and "consent" not in message, r.text
        else:
            assert "its consent does not allow this; nothing was stored" in message and "erased" not in message, r.text
        assert _stored(client, live, [e["event_id"] for e in events if e["account_id"] == live]) == []

        items = [{"touchpoint_id": f"tp-{other}-1", "account_id": live, "device_id": "tv-1", "ts": _iso(t0),
                  "channel": "email"},
                 {"touchpoint_id": f"tp-{other}-2", "account_id": other, "device_id": "tv-1", "ts": _iso(t0),
                  "channel": "email"}]
        r = client.post("/v1/touchpoints", json={"touchpoints": items})
        assert (r.status_code, r.json()["error"]["field"]) == (412, "touchpoints[1].account_id"), r.text
        conversions = [{"conversion_id": f"cv-{other}-1", "account_id": other, "ts": _iso(t0), "kind": "purchase"},
                       {"conversion_id": f"cv-{other}-2", "account_id": live, "ts": _iso(t0), "kind": "purchase"}]
        r = client.post("/v1/conversions", json={"conversions": conversions})
        assert (r.status_code, r.json()["error"]["field"]) == (412, "conversions[0].account_id"), r.text
