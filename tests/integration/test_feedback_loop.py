"""The loop across real servers: an assignment is logged to the feedback service, the
household says who really watched, and the label comes back into the clustering model."""

from __future__ import annotations

import time

import grpc
import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from services.common.pbutil import float_to_ts
from tests.conftest import ADMIN
from tests.helpers.households import household_events, week_start_days_ago

T0 = week_start_days_ago(40)


def _wait(fn, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except (AssertionError, grpc.RpcError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_prediction_logged_feedback_labels_the_session(start_service):
    from services.testing.ports import free_port, start_on_free_ports

    privacy, _ = start_service("privacy")

    def start_both(_attempt: int):
        # clustering and feedback call each other: their ports drawn first (both again if
        # another process takes one before its server binds it)
        ports = {"clustering": free_port(), "feedback": free_port()}
        peers = dict(privacy_addr=f"127.0.0.1:{privacy.port}", clustering_addr=f"127.0.0.1:{ports['clustering']}",
                     feedback_addr=f"127.0.0.1:{ports['feedback']}")
        return (start_service("feedback", grpc_port=ports["feedback"], **peers)[1],
                start_service("clustering", grpc_port=ports["clustering"], **peers)[1])

    fch, cch = start_on_free_ports(start_both, "feedback and clustering in process")
    cstub, fstub = cpb_grpc.ClusteringServiceStub(cch), fpb_grpc.FeedbackServiceStub(fch)
    md, fmd = ADMIN.metadata("clustering"), ADMIN.metadata("feedback")

    events, _ = household_events("acc-loop", ("kid", "parent"), days=15, start_ts=T0, seed=5)
    request = cpb.IngestEventsRequest()
    for e in events:
        request.events.add(event_id=e.event_id, account_id=e.account_id, device_id=e.device_id,
                           device_type=cpb.DEVICE_TYPE_TV if e.device_type == "tv" else cpb.DEVICE_TYPE_TABLET,
                           ts=float_to_ts(e.ts), kind=cpb.EVENT_KIND_HEARTBEAT, title_id=e.title_id,
                           genres=e.genres, duration_s=e.duration_s, series_id=e.series_id,
                           maturity=cpb.MATURITY_KIDS if e.maturity == "kids" else cpb.MATURITY_ADULT)
    cstub.IngestEvents(iter([request]), metadata=md, timeout=30)
    household = _wait(lambda: cstub.GetHousehold(cpb.GetHouseholdRequest(account_id="acc-loop"), metadata=md))
    session = household.sessions[0]
    answer = cstub.AssignSession(cpb.AssignSessionRequest(account_id="acc-loop", session_id=session.session_id),
                                 metadata=md, timeout=30).assignment
    assert len(answer.probabilities) == 2, answer
    other = next(p.person_id for p in answer.probabilities if p.person_id != answer.person_id)

    # The prediction reaches the feedback service through the outbox forwarder.
    response = _wait(lambda: fstub.RecordFeedback(fpb.RecordFeedbackRequest(
        feedback_id="fb-loop-1", prediction_id=answer.prediction_id, kind=fpb.FEEDBACK_KIND_EXPLICIT_CORRECT,
        true_person_id=other), metadata=fmd, timeout=10))
    assert response.weight == 1.0

    def labelled():
        h = cstub.GetHousehold(cpb.GetHouseholdRequest(account_id="acc-loop"), metadata=md)
        assert next(s for s in h.sessions if s.session_id == session.session_id).person_id == other
    _wait(labelled)
    again = cstub.AssignSession(cpb.AssignSessionRequest(account_id="acc-loop", session_id=session.session_id),
                                metadata=md, timeout=30).assignment
    assert again.person_id == other and again.confidence == pytest.approx(1.0)
