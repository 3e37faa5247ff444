"""Feedback's recalibration reaches the confidence clustering answers: a real feedback
gRPC server (with the permission interceptor every service runs), clustering's own
FeedbackPeer calling GetCalibrator as svc:clustering, and ClusteringApp applying what it
got. Before issue #10 the matrix refused GetCalibrator to service principals, the peer
fell back to the identity map and feedback never changed any assignment."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hearth.feedback.v1 import feedback_pb2 as fpb
from services.clustering.peers import FeedbackPeer
from services.common import config
from services.testing.inprocess import serve_service
from services.feedback.domain.evaluation import synthetic_stream
from services.feedback.domain.signals import SignalKind
from services.feedback.store import PredictionRecord
from tests.integration.test_clustering_service import T0, _app
from tests.helpers.households import household_events

NOW = time.time()


@pytest.fixture
def feedback_server(tmp_path):
    running, servicers = serve_service("feedback", config.load(service_name="feedback", data_dir=tmp_path / "feedback"))
    yield running, servicers[0][1]   # the servicer holds the rooms (intake, calibration, experiments)
    running.stop(0)


def _over_confident_feedback(app, variant: str, n: int = 600) -> None:
    """Predictions of ``variant`` that are far more confident than they are right, each
    confirmed or corrected by the household."""
    stream = synthetic_stream(n, seed=11, variant_distortion={"kmeans": 0.45, "gmm": 0.45})
    items, labels = [], []
    for i in range(n):
        k = int(stream.household_size[i])
        probs = {f"p{j + 1}": float(stream.probs[i, j]) for j in range(k)}
        top = f"p{int(np.argmax(stream.probs[i, :k])) + 1}"
        items.append(PredictionRecord(f"c{i}", f"acc-{i % 31}", f"s{i}", top, probs, variant, 1,
                                      NOW - 7200, False, k))
        labels.append((f"c{i}", top, f"p{int(stream.labels[i]) + 1}"))
    app.intake.record_predictions(items)
    for pid, top, truth in labels:
        if truth == top:
            app.intake.record_feedback(f"f-{pid}", pid, SignalKind.PROFILE_CONFIRMED, None, NOW - 60)
        else:
            app.intake.record_feedback(f"f-{pid}", pid, SignalKind.PROFILE_CORRECTED, truth, NOW - 60)


def test_feedback_changes_the_confidence_later_assignments_return(feedback_server, database):
    running, feedback_app = feedback_server
    peer = FeedbackPeer(f"127.0.0.1:{running.port}")
    # Nothing fitted yet: the peer's call is allowed and answers "no calibrator".
    assert peer.peer.call("GetCalibrator", fpb.GetCalibratorRequest(variant="gmm")).version == 0
    _over_confident_feedback(feedback_app, "gmm")
    fitted = feedback_app.calibration.recalibrate(["gmm"])
    assert fitted["gmm"].method != "identity"

    clustering = _app(database)
    events, _ = household_events("acc-cal", ("kid", "parent", "teen"), days=25, start_ts=T0, seed=1)
    clustering.store.ingest(events)
    clustering.keeper.refresh("acc-cal")
    every = clustering.store.closed_sessions("acc-cal")
    # Sessions halfway between two of the household's sessions: answers the model is
    # unsure about (a calibrator barely moves a confidence of 0.9999).
    rng = np.random.default_rng(0)
    X = np.array([s.features for s in every], dtype=np.float64)
    pairs = rng.integers(0, len(every), (200, 2))
    blended = 0.5 * (X[pairs[:, 0]] + X[pairs[:, 1]])
    answers = clustering.assign_many(["acc-cal"], blended)
    order = np.argsort([a.confidence for a in answers])[:20]
    before = [answers[i] for i in order]
    assert min(b.confidence for b in before) < 0.95

    clustering.calibrator_of = peer.calibrator          # what services.clustering wires
    calibrator = peer.calibrator("gmm")
    assert calibrator.method == fitted["gmm"].method    # fetched over gRPC, not the fallback
    after = clustering.assign_many(["acc-cal"], blended[order])
    assert [a.person_id for a in after] == [b.person_id for b in before]    # who: unchanged
    moved = [abs(a.confidence - b.confidence) for a, b in zip(after, before)]
    assert max(moved) > 0.01                             # how sure: recalibrated
