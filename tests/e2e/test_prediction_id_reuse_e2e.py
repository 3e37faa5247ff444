"""A prediction id reused with other content, through the real feedback process, as
``RecordFeedback`` answers a reused feedback id: ALREADY_EXISTS naming the item's
``prediction_id``, nothing of the request stored; the same content again stays an
idempotent duplicate (clustering's forwarder resends after a crash). Until session 33
``RecordPrediction`` counted the other content as a duplicate and kept the first, so a
caller was told its prediction was recorded while feedback on it would be judged against
another. Clustering's forwarder drops such a prediction instead of retrying the whole
forward for ever (the outbox would be jammed behind it)."""

from __future__ import annotations

import time

import grpc
import pytest

from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from services.clustering.prediction_log import CONFLICTING, PredictionLog, to_request
from services.clustering.store import ClusteringStore
from services.common.predictions import PredictionRecord
from services.common.storage.sql import SqliteDatabase
from tests.helpers.mesh_calls import acting_as_service, prediction


@pytest.fixture
def record(mesh):
    """RecordPrediction as svc:clustering, answered by the mesh's feedback process."""
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['feedback']}") as channel:
        stub = fpb_grpc.FeedbackServiceStub(channel)

        def call(request: fpb.RecordPredictionRequest) -> fpb.RecordPredictionResponse:
            return stub.RecordPrediction(request, metadata=acting_as_service(mesh, "clustering", "feedback"),
                                         timeout=30)
        yield call


def _refusal(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return exc.code(), dict(exc.trailing_metadata() or ()).get("x-hearth-error-field", "")


def test_a_reused_prediction_id_with_other_content_is_already_exists_naming_the_item(record):
    first = prediction("e2e-reuse-1", "e2e-reuse-acc")
    assert record(fpb.RecordPredictionRequest(predictions=[first])).accepted == 1
    again = record(fpb.RecordPredictionRequest(predictions=[first]))   # a retry: same content
    assert (again.accepted, again.duplicates) == (0, 1)

    other = fpb.Prediction()
    other.CopyFrom(first)
    other.probabilities["p1"], other.probabilities["p2"] = 0.6, 0.4
    fresh = prediction("e2e-reuse-2", "e2e-reuse-acc")
    with pytest.raises(grpc.RpcError) as err:
        record(fpb.RecordPredictionRequest(predictions=[fresh, other]))
    assert _refusal(err.value) == (grpc.StatusCode.ALREADY_EXISTS, "predictions[1].prediction_id")
    assert "different" in err.value.details()
    # nothing of the refused request was stored: the fresh one is new on its own
    assert record(fpb.RecordPredictionRequest(predictions=[fresh])).accepted == 1

    # one id twice in one request, with two contents
    twin = prediction("e2e-reuse-3", "e2e-reuse-acc")
    other_twin = fpb.Prediction()
    other_twin.CopyFrom(twin)
    other_twin.session_id = "s-other"
    with pytest.raises(grpc.RpcError) as err:
        record(fpb.RecordPredictionRequest(predictions=[twin, other_twin]))
    assert _refusal(err.value) == (grpc.StatusCode.ALREADY_EXISTS, "predictions[1].prediction_id")
    same_twice = record(fpb.RecordPredictionRequest(predictions=[twin, twin]))
    assert (same_twice.accepted, same_twice.duplicates) == (1, 1)


def test_the_forwarder_drops_a_prediction_whose_id_feedback_holds_with_other_content(record, tmp_path):
    """The outbox is not jammed: the other predictions of the forward are delivered, the
    conflicting one is dropped and counted (``hearth_predictions_conflicting_total``)."""
    now = time.time()

    def mine(pid: str, p1: float) -> PredictionRecord:
        return PredictionRecord(pid, "e2e-reuse-fwd", f"s-{pid}", "p1", {"p1": p1, "p2": 1 - p1}, "kmeans", 1,
                                now - 60, False, 2)

    held = mine("e2e-reuse-fwd-1", 0.9)
    record(fpb.RecordPredictionRequest(predictions=[prediction(held.prediction_id, held.account_id)]))
    db = SqliteDatabase(tmp_path / "clustering.db")
    ClusteringStore(db).migrate()
    log = PredictionLog(db, record, forward_interval_s=3600)   # forwarded by hand
    before = CONFLICTING._value.get()
    try:
        log.record([mine("e2e-reuse-fwd-0", 0.8), held, mine("e2e-reuse-fwd-2", 0.7)])
        assert log.forward_once() == 2
        assert log.forward_once() == 0                         # nothing left in the outbox
        assert CONFLICTING._value.get() == before + 1
        # the two delivered are stored as sent (sent again: duplicates of the same content)
        resent = record(to_request([mine("e2e-reuse-fwd-0", 0.8), mine("e2e-reuse-fwd-2", 0.7)]))
        assert (resent.accepted, resent.duplicates) == (0, 2)
    finally:
        log.close()
        db.close()
