"""The export of a household Hearth holds nothing about, through the real gateway and
mesh: 200 with the whole v1 document, every section empty, consent the defaults not set
explicitly — the "nothing is held" confirmation of a GDPR Art. 15 request, as
docs/privacy.md §9 states it (since session 33; the behaviour was older, the statement was
missing) and the route's OpenAPI description says. Asking writes nothing but the audit
entry: no data key, no consent row, no household."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.helpers.waiting import SLOW_MACHINE_S


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        yield c


def _export(client: httpx.Client, account: str) -> dict:
    r = client.get(f"/v1/household/{account}/export")
    assert r.status_code == 200, r.text
    return json.loads(r.content)


def test_a_household_never_held_exports_as_nothing_held(client):
    account = f"e2e-never-held-{uuid.uuid4().hex[:12]}"
    document = _export(client, account)
    assert (document["schema"], document["v"], document["account_id"], document["complete"]) == (
        "hearth-household-export", 1, account, True)
    services = document["services"]
    assert set(services) == {"clustering", "attribution", "feedback", "privacy"}
    assert services["clustering"].pop("household_model") is None
    assert services["privacy"].pop("consent") == {"processing": True, "attribution": True, "version": 0,
                                                  "explicit": False}
    assert {(name, section): items for name, part in services.items() for section, items in part.items()
            if items != []} == {}   # every other section an empty list

    # asking wrote nothing a second export (or another route) would show
    assert _export(client, account)["services"]["privacy"]["data_keys"] == []
    assert client.get(f"/v1/consent/{account}").status_code == 404
    assert client.get(f"/v1/household/{account}").status_code == 404

    # ... but the answer is on record: the export is audited as any other
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:
        records = client.get("/v1/audit", params={"event_type": "export", "resource_prefix": f"household:{account}",
                                                  "limit": 10}).json()["records"]
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert records and {r["outcome"] for r in records} == {"success"}


def test_the_export_route_says_what_a_household_never_held_answers(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/household/{account_id}/export"]["get"]
    assert "holds nothing about" in operation["description"] and "Art. 15" in operation["description"]


def test_an_erased_household_exports_what_privacy_keeps_of_it(client):
    """A household erased since is not one "held nothing about" in every section (review33
    R12: privacy.md and the route's description said its consent was the defaults and every
    list empty): privacy keeps the account's consent record after a deletion, by design
    (privacy.md §6), and the deletion job with its receipt and the destroyed data key — so
    its export says the consent as last set (explicit) and lists them; the data holders'
    sections are empty."""
    from tests.helpers.timestamps import iso_utc
    from tests.helpers.waiting import deletion_job

    account = f"e2e-erased-export-{uuid.uuid4().hex[:12]}"
    assert client.put(f"/v1/consent/{account}", json={"processing": True, "attribution": False}).status_code == 200
    events = [{"event_id": f"{account}-{i}", "account_id": account, "device_id": "tv-1", "device_type": "tv",
               "ts": iso_utc(time.time() - 3600 + i * 300), "kind": "heartbeat", "title_id": f"t-{i}",
               "genres": ["drama"], "duration_s": 300, "maturity": "adult"} for i in range(3)]
    assert client.post("/v1/events", json={"events": events}).status_code == 200
    r = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": account},
                                        "reason": "gdpr_art17"})
    assert r.status_code == 202, r.text
    assert deletion_job(client, r.json()["job_id"])["state"] == "completed"

    services = _export(client, account)["services"]
    assert services["privacy"]["consent"] == {"processing": True, "attribution": False, "version": 1,
                                              "explicit": True}
    assert len(services["privacy"]["deletion_jobs"]) == 1
    assert services["clustering"]["household_model"] is None
    assert all(items == [] for name in ("clustering", "attribution", "feedback")
               for section, items in services[name].items() if section != "household_model")
    # what the route's description says of it
    description = client.get("/openapi.json").json()["paths"]["/v1/household/{account_id}/export"]["get"]["description"]
    assert "keeps its consent record" in description, description
