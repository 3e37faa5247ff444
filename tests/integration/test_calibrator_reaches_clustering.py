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
def feedback_server(tmp_path, start_service):
    # Feedback needs the account's processing consent: the service asks a real privacy service.
    privacy, _ = start_service("privacy")
    settings = config.load(config.service_settings_class("feedback"), service_name="feedback",
                           data_dir=tmp_path / "feedback", privacy_addr=f"127.0.0.1:{privacy.port}")
    running, servicers = serve_service("feedback", settings)
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
    # The 20 answers nearest 0.8: a level shift cannot move a near tie (the predicted
    # person must stay on top) and a temperature barely moves a confidence of 0.9999.
    order = np.argsort([abs(a.confidence - 0.8) for a in answers])[:20]
    before = [answers[i] for i in order]
    assert min(b.confidence for b in before) < 0.95

    clustering.calibrator_of = peer.calibrator          # what services.clustering wires
    calibrator = peer.calibrator("gmm")
    assert calibrator.method == fitted["gmm"].method    # fetched over gRPC, not the fallback
    after = clustering.assign_many(["acc-cal"], blended[order])
    assert [a.person_id for a in after] == [b.person_id for b in before]    # who: unchanged
    moved = [abs(a.confidence - b.confidence) for a, b in zip(after, before)]
    assert max(moved) > 0.01                             # how sure: recalibrated


def _answers_by_age(app, n: int = 900) -> None:
    """Predictions recorded over gRPC-shaped records: young models (30 sessions) that are
    far more confident than right, mature ones (400 sessions) that are calibrated, and
    young one-person answers (0.55) that are right 90 % of the time."""
    rng = np.random.default_rng(4)
    items, feedback = [], []
    for i in range(n):
        kind = i % 3
        if kind == 2:
            probs, top, truth, age = {"p1": 0.55}, "p1", ("p1" if rng.random() < 0.9 else "p9"), 30
        else:
            c = float(rng.uniform(0.55, 0.95))
            probs, top, age = {"p1": c, "p2": 1.0 - c}, "p1", (30 if kind == 0 else 400)
            right = rng.random() < (c - 0.35 if kind == 0 else c)
            truth = "p1" if right else "p2"
        items.append(PredictionRecord(f"a{i}", f"acc-{i % 17}", f"s{i}", top, probs, "gmm", 1, NOW - 7200,
                                      False, len(probs), model_sessions=age))
        feedback.append((f"a{i}", top, truth))
    app.intake.record_predictions(items)
    for pid, top, truth in feedback:
        kind = SignalKind.PROFILE_CONFIRMED if truth == top else SignalKind.PROFILE_CORRECTED
        app.intake.record_feedback(f"f-{pid}", pid, kind, None if truth == top else truth, NOW - 60)


def test_the_calibrator_clustering_applies_depends_on_the_model_age(feedback_server, database):
    running, feedback_app = feedback_server
    _answers_by_age(feedback_app)
    stored = feedback_app.calibration.store.prediction("a0")
    assert stored.model_sessions == 30                     # the model age is stored with the prediction
    fitted = feedback_app.calibration.recalibrate(["gmm"])["gmm"]
    # Young one-person answers are right 0.35 more often than they say, on 300 answers: their
    # shift moves from the common one by about half of that (LEVEL_SEGMENT_PRIOR = 300
    # pseudo-answers hold it there).
    assert fitted.segment_edges == (60,) and fitted.one_person["sessions:0-59"] > 0.12

    peer = FeedbackPeer(f"127.0.0.1:{running.port}")
    calibrator = peer.calibrator("gmm")                    # over gRPC, as clustering fetches it
    assert calibrator.segment_edges == (60,) and calibrator.one_person == fitted.one_person
    two = np.array([[0.9, 0.1]])
    young, mature = calibrator.apply(two, [30])[0, 0], calibrator.apply(two, [400])[0, 0]
    assert young < mature - 0.1, (young, mature)           # the young model's 0.9 means less
    assert calibrator.apply(np.array([[0.55]]), [30])[0, 0] > 0.65   # its one-person answer more

    # ClusteringApp records the model's age with every prediction and applies the
    # calibrator for it (a model of 0 sessions would be "unknown": the pooled map).
    clustering = _app(database)
    events, _ = household_events("acc-age", ("kid", "parent"), days=25, start_ts=T0, seed=2)
    clustering.store.ingest(events)
    clustering.keeper.refresh("acc-age")
    model = clustering.keeper.load("acc-age")[1].model
    X = np.array([s.features for s in clustering.store.closed_sessions("acc-age")][:5], dtype=np.float64)
    batch = model.assign_batch(X)
    clustering.calibrator_of = peer.calibrator
    answers, records = clustering._answer("acc-age", 1, model, batch, [""] * 5, [""] * 5)
    assert {r.model_sessions for r in records} == {model.n_sessions} and model.n_sessions > 0
    expected = calibrator.apply(batch.probabilities, np.full(5, model.n_sessions))
    assert [a.confidence for a in answers] == pytest.approx(expected.max(axis=1).tolist())


def test_the_calibration_group_crosses_the_wire_both_ways(feedback_server):
    """RecordPrediction carries each answer's calibration group (clustering's
    FeedbackPeer.send_predictions, as svc:clustering) into the feedback store, and
    GetCalibrator's calibrator carries the calibrator per group back."""
    from services.clustering.domain.model import LABEL_SHAPED_GROUP
    running, feedback_app = feedback_server
    peer = FeedbackPeer(f"127.0.0.1:{running.port}")
    rng = np.random.default_rng(5)
    records, verdicts = [], []
    for i in range(400):
        group = LABEL_SHAPED_GROUP if i % 2 else ""
        c = float(rng.uniform(0.55, 0.95))
        right = rng.random() < (c - 0.25 if group else min(c + 0.1, 1.0))
        records.append(PredictionRecord(f"w{i}", f"acc-w{i % 13}{'l' if group else 'd'}", f"s{i}", "p1", {"p1": c, "p2": 1.0 - c},
                                        "gmm", 1, NOW - 7200, False, 2, "tv-1", NOW - 7300, NOW - 7250, 400, group))
        verdicts.append((f"w{i}", right))
    for start in range(0, len(records), 100):
        peer.send_predictions(records[start:start + 100])
    assert feedback_app.intake.store.prediction("w1").calibration_group == LABEL_SHAPED_GROUP
    assert feedback_app.intake.store.prediction("w0").calibration_group == ""
    for pid, right in verdicts:
        kind = SignalKind.PROFILE_CONFIRMED if right else SignalKind.PROFILE_CORRECTED
        feedback_app.intake.record_feedback(f"f-{pid}", pid, kind, None if right else "p2", NOW - 60)
    fitted = feedback_app.calibration.recalibrate(["gmm"])["gmm"]
    fetched = peer.calibrator("gmm")
    assert set(fetched.groups) == {"", LABEL_SHAPED_GROUP} and fetched.groups == fitted.groups
    answer = np.array([[0.8, 0.2]])
    assert fetched.apply(answer, [400], LABEL_SHAPED_GROUP)[0, 0] < 0.8 < fetched.apply(answer, [400], "")[0, 0]
