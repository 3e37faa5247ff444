"""Feedback through the real gateway and feedback process: a prediction logged over gRPC
(as the clustering service does), feedback over HTTP, calibration and experiment read
back, flags changed at run time."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.mesh_calls import log_predictions, prediction
from tests.helpers.waiting import wait_for


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=10) as c:
        yield c


def _log_prediction(mesh, prediction_id: str, account: str) -> None:
    log_predictions(mesh, [prediction(prediction_id, account, session_id="s-e2e")])


def test_feedback_calibration_and_flags_over_http(client, mesh):
    _log_prediction(mesh, "e2e-pred-1", "e2e-fb-acc")
    body = {"feedback_id": "e2e-fb-1", "prediction_id": "e2e-pred-1", "kind": "explicit_correct",
            "true_person_id": "p2", "ts": "2026-01-01T00:00:00Z"}
    first = client.post("/v1/feedback", json=body)
    assert first.status_code == 200, first.text
    assert first.json() == {"duplicate": False, "weight": 1.0}
    assert client.post("/v1/feedback", json=body).json()["duplicate"] is True

    missing = client.post("/v1/feedback", json={**body, "feedback_id": "e2e-fb-2", "prediction_id": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "prediction_id"
    no_person = client.post("/v1/feedback", json={**body, "feedback_id": "e2e-fb-3", "true_person_id": None})
    assert no_person.status_code == 422 and no_person.json()["error"]["field"] == "true_person_id"

    calibration = client.get("/v1/calibration", params={"group_by": "variant", "bins": 5})
    assert calibration.status_code == 200, calibration.text
    groups = {g["group"]: g for g in calibration.json()["groups"]}
    assert groups["kmeans"]["n"] >= 1 and groups["kmeans"]["bins"]
    assert client.get("/v1/calibration", params={"group_by": "country"}).status_code == 422
    # docs/feedback.md, "Calibration groups": until session 19 the gateway refused it (422)
    by_group = client.get("/v1/calibration", params={"group_by": "calibration_group"})
    assert by_group.status_code == 200, by_group.text
    assert "default" in {g["group"] for g in by_group.json()["groups"]}

    # a volunteered correction ("not me") is stored, but calibration does not count it
    _log_prediction(mesh, "e2e-pred-2", "e2e-fb-acc")
    volunteered = {**body, "feedback_id": "e2e-fb-4", "prediction_id": "e2e-pred-2", "unprompted": True}
    assert client.post("/v1/feedback", json=volunteered).json() == {"duplicate": False, "weight": 1.0}
    again = client.get("/v1/calibration", params={"group_by": "variant", "bins": 5}).json()
    assert {g["group"]: g["n"] for g in again["groups"]}["kmeans"] == groups["kmeans"]["n"]
    vague = client.post("/v1/feedback", json={**volunteered, "feedback_id": "e2e-fb-5", "unprompted": "maybe"})
    assert vague.status_code == 422 and vague.json()["error"]["field"] == "unprompted"

    put = client.put("/v1/experiment", json={"traffic": {"kmeans": 60, "gmm": 40}, "kill_switch": False,
                                             "reason": "e2e split"})
    assert put.status_code == 200, put.text
    version = put.json()["version"]
    bad = client.put("/v1/experiment", json={"traffic": {"kmeans": 60, "gmm": 30}, "kill_switch": False,
                                             "reason": "does not sum to 100"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "traffic"
    killed = client.put("/v1/experiment", json={"kill_switch": True, "reason": "e2e kill switch"})
    assert killed.json()["version"] == version + 1
    experiment = client.get("/v1/experiment", params={"account_id": "e2e-fb-acc"}).json()
    assert experiment["kill_switch"] is True and experiment["variant"] == "gmm"  # the control
    assert experiment["traffic"] == {"kmeans": 60.0, "gmm": 40.0}
    client.put("/v1/experiment", json={"kill_switch": False, "reason": "e2e done"})


def test_feedback_needs_the_accounts_processing_consent(client, mesh):
    """Feedback names who watched and moves the household's model (its labels go to
    clustering): after a withdrawal it is refused like ingest and assignment, and nothing
    is stored (until session 17 it was stored and refitted the withdrawn household)."""
    account = "e2e-fb-withdrawn"
    _log_prediction(mesh, "e2e-pred-withdrawn", account)
    assert client.put(f"/v1/consent/{account}", json={"processing": False, "attribution": False}).status_code == 200
    body = {"feedback_id": "e2e-fb-w1", "prediction_id": "e2e-pred-withdrawn", "kind": "explicit_correct",
            "true_person_id": "p2"}
    refused = client.post("/v1/feedback", json=body)
    assert refused.status_code == 412, refused.text
    assert refused.json()["error"]["field"] == "account_id"
    export = client.get(f"/v1/household/{account}/export")
    assert export.status_code == 200 and export.json()["services"]["feedback"]["feedback"] == []

    assert client.put(f"/v1/consent/{account}", json={"processing": True, "attribution": True}).status_code == 200
    # Consent answers are cached up to HEARTH_CONSENT_CACHE_S per service (docs/privacy.md, "Consent";
    # 5 s in production, 1 s in the tests' meshes).
    accepted = wait_for(lambda: (r := client.post("/v1/feedback", json=body)).status_code == 200 and r,
                        what="feedback accepted again once consent is given")
    assert accepted.json() == {"duplicate": False, "weight": 1.0}
