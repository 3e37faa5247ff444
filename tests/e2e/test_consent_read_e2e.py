"""``GET /v1/consent/{account_id}`` through the real gateway and privacy process: what
``PUT`` wrote is read back (flags and version), an account that never set consent is 404
(the defaults apply, said in the message), a malformed id is 422 naming ``account_id``,
and only the people's roles holding ``read_consent`` (privacy officer, admin) may read it —
not an API key in the service role (session 34: an ingest pipeline's key read any account's
consent), which gets the same 403 whatever the account. Until session 33 consent could be
written over HTTP but read only over gRPC (``Consent/GetConsent``)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from services.testing.mesh import write_api_key


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        yield c


def test_consent_written_is_read_back(client):
    account = f"e2e-consent-read-{uuid.uuid4().hex[:12]}"
    put = client.put(f"/v1/consent/{account}", json={"processing": True, "attribution": False})
    assert put.status_code == 200, put.text
    got = client.get(f"/v1/consent/{account}")
    assert got.status_code == 200, got.text
    assert got.json() == put.json() == {"account_id": account, "processing": True, "attribution": False,
                                        "version": 1}
    assert client.put(f"/v1/consent/{account}", json={"processing": False, "attribution": False}).status_code == 200
    assert client.get(f"/v1/consent/{account}").json() == {"account_id": account, "processing": False,
                                                           "attribution": False, "version": 2}


def test_consent_of_an_account_that_never_set_it_is_404(client):
    r = client.get(f"/v1/consent/e2e-consent-never-{uuid.uuid4().hex[:12]}")
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["field"] == "account_id" and error["code"] == "not_found"
    assert "allowed" in error["message"]   # the defaults that apply are said


@pytest.mark.parametrize("account", ["-starts-with-a-dash", "a" * 129, "a" * 300])
def test_consent_read_of_a_malformed_id_is_422_naming_it(client, account):
    r = client.get(f"/v1/consent/{account}")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "account_id"


def test_consent_read_needs_read_consent(client, mesh):
    account = f"e2e-consent-roles-{uuid.uuid4().hex[:12]}"
    assert client.put(f"/v1/consent/{account}", json={"processing": True, "attribution": True}).status_code == 200
    keys = mesh.data_dir / "gateway-keys.json"
    for role, status in (("analyst", 403), ("data_scientist", 403), ("privacy_officer", 200), ("service", 403)):
        key = write_api_key(keys, f"e2e-consent-read-{role}", role)
        r = httpx.get(f"{mesh.url}/v1/consent/{account}", headers={"X-API-Key": key}, timeout=30)
        assert r.status_code == status, (role, r.text)
    assert httpx.get(f"{mesh.url}/v1/consent/{account}", timeout=30).status_code == 401


def test_consent_read_is_in_the_openapi_document(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/consent/{account_id}"]["get"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ConsentOut")
    assert "never set" in operation["responses"]["404"]["description"]


def test_a_service_key_learns_nothing_of_an_account_from_the_consent_route(client, mesh):
    """An API key is bound to a principal and a role, not to accounts, so a service-role
    key (an ingest pipeline's) is refused every account's consent: one 403, decided before
    privacy is asked, for an account that set consent, one that never did and a malformed
    id alike — a 404 for the never-set account would tell which accounts exist. The key
    still ingests (its role's work). Before session 34: 200 with the flags and version."""
    set_account = f"e2e-consent-svc-{uuid.uuid4().hex[:12]}"
    never = f"e2e-consent-svc-never-{uuid.uuid4().hex[:12]}"
    assert client.put(f"/v1/consent/{set_account}", json={"processing": False, "attribution": True}).status_code == 200
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "e2e-consent-ingest-pipeline", "service")
    answers = [httpx.get(f"{mesh.url}/v1/consent/{account}", headers={"X-API-Key": key}, timeout=30)
               for account in (set_account, never, "-malformed")]
    assert [a.status_code for a in answers] == [403, 403, 403], [a.text for a in answers]
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert answers[0].json()["error"]["code"] == "permission_denied"
    assert set_account not in answers[0].text
    # The same key still does its role's work: an event of a consenting account is stored.
    event = {"event_id": f"e-{uuid.uuid4().hex[:8]}", "account_id": never, "device_id": "tv-1",
             "device_type": "tv", "ts": "2026-01-05T20:00:00Z", "kind": "heartbeat", "duration_s": 60}
    r = httpx.post(f"{mesh.url}/v1/events", json={"events": [event]}, headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_service_keys_refused_write_says_not_stored_and_no_more(client, mesh):
    """Session 35's decision (docs/privacy.md §8, "What a writer learns"): a write for an
    account whose consent refuses it stays a 412 — the writer (a service-role key) must know
    its items were not stored and must not retry them — but the body says only that: the
    item, "consent", "nothing was stored". Which purpose was withdrawn is not said, so a
    touchpoint refused for withdrawn processing and one refused for withdrawn attribution
    answer the same body (until session 35 the message named the purpose: the write told a
    service key which flag the household had set, which its 403 on the consent read hides)."""
    no_processing = f"e2e-consent-w1-{uuid.uuid4().hex[:12]}"
    no_attribution = f"e2e-consent-w2-{uuid.uuid4().hex[:12]}"
    assert client.put(f"/v1/consent/{no_processing}", json={"processing": False, "attribution": True}).status_code == 200
    assert client.put(f"/v1/consent/{no_attribution}", json={"processing": True, "attribution": False}).status_code == 200
    key = write_api_key(mesh.data_dir / "gateway-keys.json", "e2e-consent-writer", "service")
    bodies = []
    for account in (no_processing, no_attribution):
        tp = {"touchpoint_id": f"tp-{account}", "account_id": account, "device_id": "tv-1",
              "ts": "2026-01-05T20:00:00Z", "channel": "email"}
        r = httpx.post(f"{mesh.url}/v1/touchpoints", json={"touchpoints": [tp]}, headers={"X-API-Key": key},
                       timeout=30)
        assert r.status_code == 412, r.text
        error = r.json()["error"]
        assert error["code"] == "failed_precondition" and error["field"] == "touchpoints[0].account_id", r.text
        assert "nothing was stored" in error["message"] and "consent" in error["message"], r.text
        bodies.append(r.text.replace(account, "<account>"))
    assert bodies[0] == bodies[1]
    assert not any(purpose in bodies[0] for purpose in ("processing", "attribution")), bodies[0]
    event = {"event_id": f"e-{uuid.uuid4().hex[:8]}", "account_id": no_processing, "device_id": "tv-1",
             "device_type": "tv", "ts": "2026-01-05T20:00:00Z", "kind": "heartbeat", "duration_s": 60}
    r = httpx.post(f"{mesh.url}/v1/events", json={"events": [event]}, headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 412, r.text
    assert r.json()["error"]["field"] == "events[0].account_id" and "processing" not in r.text, r.text
    assert "nothing was stored" in r.json()["error"]["message"], r.text
