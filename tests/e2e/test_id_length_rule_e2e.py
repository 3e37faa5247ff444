"""One id rule, one answer, whatever the length and whichever door: an id over 128
characters is INVALID_ARGUMENT (HTTP 422) naming the field with the id rule's words
(services/common/ids.ID_RULE). Until session 33 three layers answered three ways: gRPC said
the id rule for 129-256 characters but the text rule's "must be at most 256 characters, got
N" past 256 (the server interceptor's generic text ceiling ran first), and HTTP said
pydantic's "String should have at most 128 characters" for any length past 128."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common.errors import ERROR_FIELD_KEY
from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY, Principal, Role
from services.common.ids import ID_RULE
from tests.helpers.mesh_calls import acting_as_service, prediction

LENGTHS = (129, 256, 257, 300, 5000)


def _as_admin(mesh, audience: str) -> list[tuple[str, str]]:
    """gRPC metadata of an admin's call as the gateway forwards it."""
    who = Principal("e2e-admin", Role.ADMIN)
    return [(PRINCIPAL_KEY, who.id), (ROLE_KEY, who.role.value),
            (TOKEN_KEY, mesh.signer("gateway").sign(who, audience=audience))]


def _refusal(call) -> tuple[str, str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code().name, dict(err.value.trailing_metadata() or ()).get(ERROR_FIELD_KEY, ""), \
        err.value.details()


@pytest.mark.parametrize("n", LENGTHS)
def test_an_overlong_id_gets_the_id_rule_over_grpc(mesh, n):
    long_id = "a" * n
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['clustering']}") as c, \
            grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['privacy']}") as p, \
            grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['feedback']}") as f:
        answers = {
            "household": _refusal(lambda: cpb_grpc.ClusteringServiceStub(c).GetHousehold(
                cpb.GetHouseholdRequest(account_id=long_id), metadata=_as_admin(mesh, "clustering"), timeout=30)),
            "consent": _refusal(lambda: ppb_grpc.ConsentStub(p).GetConsent(
                ppb.GetConsentRequest(account_id=long_id), metadata=_as_admin(mesh, "privacy"), timeout=30)),
            "prediction": _refusal(lambda: fpb_grpc.FeedbackServiceStub(f).RecordPrediction(
                fpb.RecordPredictionRequest(predictions=[prediction(long_id, "e2e-idlen")]),
                metadata=acting_as_service(mesh, "clustering", "feedback"), timeout=30)),
        }
    assert answers == {
        "household": ("INVALID_ARGUMENT", "account_id", f"account_id: {ID_RULE}"),
        "consent": ("INVALID_ARGUMENT", "account_id", f"account_id: {ID_RULE}"),
        "prediction": ("INVALID_ARGUMENT", "predictions[0].prediction_id",
                       f"predictions[0].prediction_id: {ID_RULE}"),
    }


@pytest.mark.parametrize("n", LENGTHS)
def test_an_overlong_id_gets_the_id_rule_over_http(mesh, n):
    long_id = "a" * n
    event = {"event_id": long_id, "account_id": "e2e-idlen", "device_id": "tv", "device_type": "tv",
             "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600)), "kind": "heartbeat",
             "title_id": "t", "genres": [], "duration_s": 3}
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        answers = [client.get(f"/v1/household/{long_id}"), client.get(f"/v1/consent/{long_id}"),
                   client.post("/v1/events", json={"events": [event]}),
                   client.get(f"/v1/delete/{long_id}"), client.get("/v1/experiment", params={"account_id": long_id})]
    assert [(r.status_code, r.json()["error"]["field"], r.json()["error"]["message"]) for r in answers] == [
        (422, "account_id", ID_RULE), (422, "account_id", ID_RULE), (422, "events[0].event_id", ID_RULE),
        (422, "job_id", ID_RULE), (422, "account_id", ID_RULE)]
