"""`GET /v1/household/{id}?cursor=` through the real gateway: a cursor the service did not
issue is a 422 naming `cursor`, the query parameter the HTTP caller sent. Until session
18 it named `page_token`, the gRPC field behind it, which no HTTP caller knows
(docs/operations.md, "Page with the cursor")."""

from __future__ import annotations

import pytest

from services.common.identity import Role

from .test_input import event


@pytest.fixture(scope="module")
def admin(security_mesh):
    with security_mesh.client(Role.ADMIN) as client:
        yield client


def test_a_cursor_the_service_did_not_issue_is_refused_naming_cursor(admin):
    # Two sessions (events three hours apart on one device): two pages of one.
    events = [event("sec-cursor", 0), event("sec-cursor", 1, ts=event("sec-cursor", -180)["ts"])]
    assert admin.post("/v1/events", json={"events": events}).status_code == 200
    first = admin.get("/v1/household/sec-cursor", params={"limit": 1})
    assert first.status_code == 200 and first.json()["next_cursor"], first.text
    second = admin.get("/v1/household/sec-cursor", params={"limit": 1, "cursor": first.json()["next_cursor"]})
    assert second.status_code == 200 and len(second.json()["sessions"]) == 1
    assert second.json()["sessions"][0]["session_id"] != first.json()["sessions"][0]["session_id"]

    forged = admin.get("/v1/household/sec-cursor", params={"cursor": "not-a-cursor"})
    assert forged.status_code == 422, forged.text
    assert forged.json()["error"]["code"] == "invalid_argument"
    assert forged.json()["error"]["field"] == "cursor"
    assert "page_token" not in forged.text
