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
