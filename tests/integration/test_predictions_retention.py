"""Predictions about sessions older than the retention window (session 31's "Left", fence32),
on real SQLite and PostgreSQL. ``RecordPrediction`` stored them — calibration used them until
the retention purge's next check erased them — as ``RecordFeedback`` stored old feedback until
session 31 (mem31). Now feedback refuses them, INVALID_ARGUMENT naming the field the purge
judges them by, and clustering's forwarder does not send them: a forward refused for one
would be retried for ever, holding back every prediction behind it."""

from __future__ import annotations

import time

import pytest

from services.clustering.prediction_log import PredictionLog
from services.clustering.store import ClusteringStore
from services.common.errors import InvalidArgument
from services.common.predictions import PredictionRecord
from services.feedback.app import FeedbackApp, FeedbackPolicy
from services.feedback.peers import RecordingAuditor, RecordingRefits
from services.feedback.servicer import FeedbackServicer
from services.feedback.store import FeedbackStore
from tests.integration.test_calibration_groups import feedback_db  # noqa: F401 - the fixture: feedback's own database

DAY = 86400.0
RETENTION_S = 90 * DAY


def _prediction(pid: str, ts: float, session_start: float | None = None) -> PredictionRecord:
    return PredictionRecord(pid, "acc-ret", f"s-{pid}", "p1", {"p1": 0.8, "p2": 0.2}, "kmeans", 1, ts, False, 2,
                            session_start=session_start,
                            session_end=None if session_start is None else session_start + 1800)


def _feedback(database) -> FeedbackApp:
    store = FeedbackStore(database)
    store.migrate()
    return FeedbackApp(store, FeedbackPolicy(), refits=RecordingRefits(), auditor=RecordingAuditor(),
                       retention_s=RETENTION_S)


def test_a_prediction_about_a_session_older_than_the_retention_is_refused_naming_the_field(database):
    app = _feedback(database)
    now = time.time()
    with pytest.raises(InvalidArgument) as err:   # made now, about a session 100 days old
        app.intake.record_predictions([_prediction("fresh", now - 60, now - 3600),
                                       _prediction("old-session", now - 60, now - 100 * DAY)])
    assert err.value.field == "predictions[1].session_start"
    with pytest.raises(InvalidArgument) as err:   # a bare vector's, judged by its own time
        app.intake.record_predictions([_prediction("old-bare", now - 100 * DAY)])
    assert err.value.field == "predictions[0].ts"
    assert [app.store.prediction(p) for p in ("fresh", "old-session", "old-bare")] == [None, None, None]
    assert app.intake.record_predictions([_prediction("edge", now - 60, now - 89 * DAY),
                                          _prediction("fresh", now - 60, now - 3600)]) == (2, 0)


def test_the_forwarder_does_not_send_what_feedback_would_refuse_for_its_age(database, feedback_db):
    """Without it the forward failed (INVALID_ARGUMENT) at every pass and the fresh prediction
    queued with the old one never reached feedback."""
    ClusteringStore(database).migrate()
    feedback = FeedbackServicer(_feedback(feedback_db).intake, None, None)
    log = PredictionLog(database, lambda request: feedback.RecordPrediction(request, None),
                        forward_interval_s=3600, retention_s=RETENTION_S)   # forwarded by hand
    try:
        now = time.time()
        log.record([_prediction("old-session", now - 60, now - 100 * DAY), _prediction("fresh", now - 60, now - 3600),
                    _prediction("old-bare", now - 91 * DAY)])
        assert log.forward_once() == 1
        assert log.forward_once() == 0                         # nothing left in the outbox
        store = FeedbackStore(feedback_db)
        assert [p for p in ("old-session", "fresh", "old-bare") if store.prediction(p)] == ["fresh"]
    finally:
        log.close()
