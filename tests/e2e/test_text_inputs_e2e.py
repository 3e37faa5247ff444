"""Bad text through the real gateway and services: a NUL, a control character, a
bidirectional override, an over-long value, bytes that are not UTF-8 and a JSON escape of
a lone surrogate, in path, query and body inputs of the gateway's routes. Each is a 4xx
naming the input where one is named — never a 5xx (until session 30 a NUL in the audit
resource prefix or a feedback reason reached PostgreSQL: 502). The pattern of every route's
text input is checked from /openapi.json in tests/unit/test_gateway_text_fields.py; this
is the same refusal seen end to end."""

from __future__ import annotations

import time

import httpx
import pytest


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        yield c


def _event(genre: str) -> dict:
    return {"event_id": "e2e-text-e1", "account_id": "e2e-text-acc", "device_id": "tv-1", "device_type": "tv",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600)), "kind": "heartbeat",
            "title_id": "t-1", "genres": [genre], "duration_s": 60}


BAD_QUERY = ["%00", "x%01", "x%E2%80%AE", "x%FF", "x%ED%A0%80"]


@pytest.mark.parametrize("bad", BAD_QUERY)
def test_bad_text_in_query_and_path_inputs_is_a_4xx(client, bad):
    answers = {
        "resource_prefix": client.get(f"/v1/audit?resource_prefix={bad}"),
        "cursor": client.get(f"/v1/household/e2e-text-acc?cursor={bad}"),
        "account_id": client.get(f"/v1/household/acc{bad}"),
        "job_id": client.get(f"/v1/delete/job{bad}"),
    }
    wrong = {name: (r.status_code, r.text[:200]) for name, r in answers.items() if not 400 <= r.status_code < 500}
    assert wrong == {}
    for name, r in answers.items():
        assert r.json()["error"]["field"] == name, (name, r.text)


@pytest.mark.parametrize("bad", ["drama\x00", "drama\x1b", "drama\u202e", "drama\u2028", "d" * 65])
def test_bad_text_in_a_body_field_is_422_naming_it(client, bad):
    r = client.post("/v1/events", json={"events": [_event(bad)]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "events[0].genres[0]", r.text
    reason = "w" * 501 if len(bad) > 64 else "why " + bad
    r = client.put("/v1/experiment", json={"traffic": {}, "kill_switch": False, "reason": reason})
    assert r.status_code == 422 and r.json()["error"]["field"] == "reason", r.text


def test_a_body_that_is_not_utf8_or_holds_a_lone_surrogate_is_a_4xx(client):
    body = ('{"events": [{"event_id": "e2e-text-e2", "account_id": "e2e-text-acc", "device_id": "tv-1", '
            '"device_type": "tv", "ts": "2026-12-01T00:00:00Z", "kind": "heartbeat", "genres": ["GENRE"]}]}')
    for raw in (body.replace("GENRE", "\\ud800").encode(), body.encode().replace(b"GENRE", b"dr\xffama")):
        r = client.post("/v1/events", content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[-40:], r.status_code, r.text)
