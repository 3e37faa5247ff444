"""The labels calibration reads: the newest ``label_window`` prompted signals (session 31,
mem31), on real SQLite and PostgreSQL (``database`` fixture). Before, every periodic check
and GetCalibration read every label held, so the feedback service's memory grew with the
labels (docs/benchmarks.md, "Feedback's memory and the labels it reads")."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from services.feedback.app import FeedbackApp, FeedbackPolicy
from services.feedback.dataset import build_dataset
from services.feedback.domain.signals import SignalKind
from services.feedback.peers import RecordingAuditor, RecordingRefits
from services.feedback.store import FeedbackStore, PredictionRecord

T0 = float(int(time.time()) - 7200)


def make_app(database, clock: list[float], **policy) -> FeedbackApp:
    store = FeedbackStore(database)
    store.migrate()
    return FeedbackApp(store, FeedbackPolicy(**policy), refits=RecordingRefits(), auditor=RecordingAuditor(),
                       clock=lambda: clock[0])


def label(app: FeedbackApp, clock: list[float], i: int, *, step: float = 1.0) -> None:
    """Prediction ``q<i>`` and a label on it, received at the clock, which then moves ``step``."""
    p = 0.55 + (i % 9) * 0.05
    app.intake.record_predictions([PredictionRecord(f"q{i:03d}", f"acc-{i % 4}", f"s{i}", "p1",
                                                    {"p1": p, "p2": 1 - p}, "kmeans", 1, T0 - 3600, False, 2)])
    right = i % 3 != 0
    app.intake.record_feedback(f"f{i:03d}", f"q{i:03d}", SignalKind.PROFILE_CONFIRMED if right
                               else SignalKind.PROFILE_CORRECTED, None if right else "p2", T0 - 60)
    clock[0] += step


def test_calibration_reads_only_the_newest_labels_of_its_window(database):
    clock = [T0]
    app = make_app(database, clock, label_window=30)
    for i in range(50):
        # pairs received at the same time: the window's edge falls between two of a tie
        label(app, clock, i, step=1.0 if i % 2 else 0.0)
    every = app.store.feedback_joined(prompted_only=True)
    newest = app.store.feedback_joined(prompted_only=True, newest=30)
    assert [r.feedback_id for r in newest] == [r.feedback_id for r in every[-30:]]
    assert [r.feedback_id for r in newest][:2] == ["f020", "f021"]
    data = app.calibration.dataset()
    assert sorted(data.prediction_ids.tolist()) == [f"q{i:03d}" for i in range(20, 50)]
    assert REGISTRY.get_sample_value("hearth_feedback_labels_read") == 30   # the window binds: operators see it
    # the same arrays as building the newest 30 of all: only the rows read differ
    expected = build_dataset(every[-30:])
    assert data.prediction_ids.tolist() == expected.prediction_ids.tolist()
    assert (data.probs == expected.probs).all() and (data.correct == expected.correct).all()
    # below the window nothing changes: a window of 50 or none reads every label
    for window in (50, 0):
        app.calibration.policy = FeedbackPolicy(label_window=window)
        assert app.calibration.dataset().prediction_ids.tolist() == build_dataset(every).prediction_ids.tolist()


def test_a_full_window_still_refits_after_enough_new_labels(database):
    """With the window full the dataset's size stops growing: counting new labels as rows
    beyond what the fit read would never refit again."""
    clock = [T0]
    app = make_app(database, clock, label_window=30, recalibrate_min_new=10)
    for i in range(30):
        label(app, clock, i)
    assert set(app.calibration.recalibrate_if_due()) == {"kmeans"}
    assert app.calibration.calibrator_version() == "kmeans:1"
    for i in range(30, 39):
        label(app, clock, i)
    assert app.calibration.recalibrate_if_due() == {}      # 9 new: not yet
    label(app, clock, 39)
    fitted = app.calibration.recalibrate_if_due()          # 10 new
    assert set(fitted) == {"kmeans"} and app.calibration.calibrator_version() == "kmeans:2"
    assert fitted["kmeans"].training["received_through"] == clock[0] - 1
    assert app.calibration.recalibrate_if_due() == {}


def test_the_retention_purge_deletes_labels_older_than_its_end(database):
    """A label's lifetime is its data's (docs/feedback.md "Which labels calibration reads,
    and how long labels live"): privacy's retention purge (a window scope of every account
    ending at now - HEARTH_RETENTION_DAYS) deletes labels given before its end and labels,
    however recent, on predictions about sessions before it; it keeps the rest."""
    from services.common.erasure import ErasureScope

    clock = [T0]
    app = make_app(database, clock)
    end = T0 - 1000
    cases = {  # prediction id: (session start, session end, label ts)
        "old-session": (end - 500, end - 400, T0 - 10),      # recent label, old session: deleted
        "old-label": (end + 100, end + 200, end - 50),       # label given before the end: deleted
        "recent": (end + 100, end + 200, end + 300),         # kept
    }
    for pid, (start, stop, ts) in cases.items():
        app.intake.record_predictions([PredictionRecord(pid, "acc-r", f"s-{pid}", "p1", {"p1": 0.8, "p2": 0.2},
                                                        "kmeans", 1, stop, False, 2, "tv", start, stop)])
        app.intake.record_feedback(f"f-{pid}", pid, SignalKind.PROFILE_CONFIRMED, None, ts)
    outcome = app.intake.erase(ErasureScope("*", "window", end=end))
    assert sorted(outcome.deleted_ids) == ["feedback:f-old-label", "feedback:f-old-session", "predictions:old-session"]
    assert [r.feedback_id for r in app.store.feedback_joined()] == ["f-recent"]
    assert app.calibration.dataset().prediction_ids.tolist() == ["recent"]


def test_feedback_older_than_the_retention_is_refused_naming_ts_and_not_stored(database):
    """With the retention purge on, feedback given before now - HEARTH_RETENTION_DAYS was
    stored (and forwarded to clustering as a label), then erased by the purge's next check
    with no sign to the client — as events were until session 21. Now refused like them."""
    import pytest

    from services.common.errors import InvalidArgument

    store = FeedbackStore(database)
    store.migrate()
    day = 86400.0
    app = FeedbackApp(store, FeedbackPolicy(), refits=RecordingRefits(), auditor=RecordingAuditor(),
                      retention_s=90 * day)
    now = time.time()
    app.intake.record_predictions([PredictionRecord("q-ret", "acc-ret", "s-ret", "p1", {"p1": 0.8, "p2": 0.2},
                                                    "kmeans", 1, now - 3600, False, 2)])
    with pytest.raises(InvalidArgument) as err:
        app.intake.record_feedback("f-old", "q-ret", SignalKind.PROFILE_CONFIRMED, None, now - 100 * day)
    assert err.value.field == "ts"
    assert app.store.feedback_joined() == []
    assert app.intake.record_feedback("f-new", "q-ret", SignalKind.PROFILE_CONFIRMED, None, now - 89 * day) == (False, 1.0)
    assert [r.feedback_id for r in app.store.feedback_joined()] == ["f-new"]
