"""README's "Using it" followed as a new user would, through the real mesh (user32).

A new user posts the README's one event and reads the household back. Until session 32 the
answer contradicted itself: the session said `person_id: "p1"` and `status.persons` said 1,
but `persons` was `[]` — a household in its cold start (fewer than 10 sessions, no fitted
model) has no profile, and only profiled persons were listed. A bad id was refused with
pydantic's regular expression (`String should match pattern '^[A-Za-z0-9]...'`) where a
gRPC caller reads the rule in words."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from services.common.ids import ID_RULE
from tests.helpers.waiting import SLOW_MACHINE_S

RUN = uuid.uuid4().hex[:6]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _readme_event(account: str, **over) -> dict:
    event = {"event_id": "e1", "account_id": account, "device_id": "tv-1", "device_type": "tv",
             "ts": _iso(time.time() - 3 * 3600), "kind": "play_start", "title_id": "t-42", "genres": ["drama"],
             "duration_s": 1800, "maturity": "adult"}
    event.update(over)
    return event


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as c:
        yield c


def _settled(client: httpx.Client, account: str) -> dict:
    deadline = time.monotonic() + SLOW_MACHINE_S
    while True:
        body = client.get(f"/v1/household/{account}").json()
        if body.get("status", {}).get("settled") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_a_household_in_its_cold_start_lists_the_person_its_sessions_name(client):
    account = f"readme-{RUN}"
    r = client.post("/v1/events", json={"events": [_readme_event(account)]})
    assert r.status_code == 200, r.text
    body = _settled(client, account)
    assert body["status"]["settled"], body["status"]
    named = {s["person_id"] for s in body["sessions"]}
    assert named == {"p1"}, body["sessions"]
    assert body["status"]["persons"] == 1
    # The persons listed are the persons the sessions and the count name (no profile yet).
    assert [(p["person_id"], p["session_count"]) for p in body["persons"]] == [("p1", 1)], body["persons"]


@pytest.mark.parametrize("field", ["event_id", "account_id", "title_id"])
def test_a_bad_id_is_refused_with_the_id_rule_in_words_not_a_regular_expression(client, field):
    account = f"readme-bad-{RUN}"
    r = client.post("/v1/events", json={"events": [_readme_event(account, **{field: "t-42 (pilot)"})]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == f"events[0].{field}"
    assert error["message"] == ID_RULE, error


def test_a_control_character_in_a_text_field_is_named_as_a_grpc_caller_reads_it(client):
    r = client.post("/v1/events", json={"events": [_readme_event(f"readme-bad-{RUN}", genres=["dra\u0007ma"])]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "events[0].genres[0]"
    assert error["message"] == "must not contain control characters (U+0007 at character 3)", error


@pytest.mark.parametrize("path, body, field, message", [
    ("/v1/events", {"events": [_readme_event("readme-future", ts="2030-01-01T00:00:00Z")]}, "events[0].ts",
     "must lie between 2000-01-01 and 10 minutes from now (the server's clock)"),
    ("/v1/delete", {"scope": {"kind": "device", "account_id": "readme-x"}}, "scope.device_id",
     "required for a device scope"),
    ("/v1/delete", {"scope": {"kind": "window", "account_id": "readme-x", "start": "2026-12-07T00:00:00Z",
                              "end": "2026-12-06T00:00:00Z"}}, "scope.end",
     "must be after start (2026-12-07T00:00:00.000000Z)"),
])
def test_a_validators_refusal_reads_without_pydantics_prefix(client, path, body, field, message):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_argument", "field": field, "message": message}


def test_feedback_names_what_is_wrong_with_kind_and_a_missing_true_person(mesh, client):
    """gRPC RecordFeedback: kind 99 said "is required" (as for no kind at all), and an
    EXPLICIT_CORRECT without true_person_id got the id rule's words, as if a bad id had
    been sent. Over HTTP the same missing person."""
    import grpc

    from hearth.feedback.v1 import feedback_pb2 as fpb
    from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
    from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role

    pipeline = Principal("readme-pipeline", Role.ADMIN)
    metadata = [(PRINCIPAL_KEY, pipeline.id), (ROLE_KEY, pipeline.role.value),
                (TOKEN_KEY, mesh.signer("gateway").sign(pipeline, audience="feedback"))]
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['feedback']}") as channel:
        stub = fpb_grpc.FeedbackServiceStub(channel)
        for kind, words in [(0, "kind: is required: one of"), (99, "kind: unknown value 99: one of")]:
            with pytest.raises(grpc.RpcError) as refused:
                stub.RecordFeedback(fpb.RecordFeedbackRequest(feedback_id="f-x", prediction_id="pr-x", kind=kind),
                                    metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith(words), refused.value.details()
    r = client.post("/v1/feedback", json={"feedback_id": "f-x", "prediction_id": "pr-x", "kind": "explicit_correct"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "true_person_id" and "is required for a correction" in error["message"], error


@pytest.mark.parametrize("method, path, kwargs", [
    ("GET", "/v1/audit", {"params": {"start": "2026-12-07T16:40:00Z", "end": "2026-12-07T16:30:00Z"}}),
    ("POST", "/v1/attribution", {"json": {"start": "2026-12-07T16:40:00Z", "end": "2026-12-07T16:30:00Z"}}),
])
def test_an_end_before_start_names_the_http_field_end_not_the_grpc_window(client, method, path, kwargs):
    """The HTTP caller sent `end`; the 422 named `window.end`, the gRPC request's field."""
    r = client.request(method, path, **kwargs)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_argument", "field": "end", "message": "must be after start"}
