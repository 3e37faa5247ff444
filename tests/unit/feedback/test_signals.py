"""Feedback signals: weights, combination rules, alignment with predictions."""

from __future__ import annotations

import numpy as np
import pytest

from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.metrics import UNKNOWN_LABEL, calibration_summary
from services.feedback.domain.signals import (
    FeedbackRecord,
    PlaybackThresholds,
    SignalKind,
    SignalWeights,
    align_evidence,
    classify_playback,
    interpret_feedback,
)

K = SignalKind


def rec(pid: str, kind: SignalKind, person: str | None = None, ts: float = 0.0, predicted: str = "p1") -> FeedbackRecord:
    return FeedbackRecord(prediction_id=pid, kind=kind, predicted_person=predicted, person=person, ts=ts)


def test_documented_default_weights() -> None:
    w = SignalWeights()
    assert [w.of(k) for k in K] == [1.0, 1.0, 0.8, 0.5, 0.3, 0.2]
    # Implicit evidence can never weigh as much as an explicit confirmation.
    assert w.implicit_cap < w.profile_confirmed


def test_explicit_confirmation_is_a_full_weight_label() -> None:
    right, wrong = interpret_feedback([rec("a", K.PROFILE_CONFIRMED, "p1"), rec("b", K.PROFILE_CONFIRMED, "p2")])
    assert (right.correct, right.weight, right.label) == (True, 1.0, "p1")
    assert (wrong.correct, wrong.weight, wrong.label) == (False, 1.0, "p2")


def test_correction_is_a_full_weight_labelled_negative() -> None:
    (evidence,) = interpret_feedback([rec("a", K.PROFILE_CORRECTED, "p2")])
    assert (evidence.correct, evidence.weight, evidence.label) == (False, 1.0, "p2")
    # A confirmation and a correction weigh the same: the latest word counts.
    (later,) = interpret_feedback([rec("b", K.PROFILE_CORRECTED, "p2", ts=1), rec("b", K.PROFILE_CONFIRMED, "p1", ts=2)])
    assert later.correct and later.label == "p1"


def test_switch_is_a_labelled_negative() -> None:
    (evidence,) = interpret_feedback([rec("a", K.PROFILE_SWITCHED, "p3")])
    assert (evidence.correct, evidence.weight, evidence.label, evidence.source) == (False, 0.8, "p3", K.PROFILE_SWITCHED)


def test_implicit_signals_are_weak_and_unlabelled() -> None:
    positive, negative = interpret_feedback([rec("a", K.CONTINUED_RECOMMENDATION), rec("b", K.ABANDONED_QUICKLY)])
    assert (positive.correct, positive.weight, positive.label) == (True, 0.3, None)
    assert (negative.correct, negative.weight, negative.label) == (False, 0.2, None)


def test_explicit_overrules_implicit_and_strongest_explicit_wins() -> None:
    records = [
        rec("a", K.CONTINUED_RECOMMENDATION, ts=1),
        rec("a", K.PROFILE_SWITCHED, "p2", ts=2),
        rec("a", K.PROFILE_CONFIRMED, "p1", ts=0),  # earlier but stronger than the switch
    ]
    (evidence,) = interpret_feedback(records)
    assert (evidence.correct, evidence.weight, evidence.label, evidence.signals) == (True, 1.0, "p1", 3)


def test_equal_weight_explicit_signals_latest_wins() -> None:
    (evidence,) = interpret_feedback([rec("a", K.PROFILE_HINT, "p2", ts=5), rec("a", K.PROFILE_HINT, "p1", ts=9)])
    assert evidence.label == "p1" and evidence.correct


def test_implicit_votes_net_out_and_are_capped() -> None:
    # +0.3 - 0.2 = +0.1 -> weak positive of weight 0.1
    (net,) = interpret_feedback([rec("a", K.CONTINUED_RECOMMENDATION), rec("a", K.ABANDONED_QUICKLY)])
    assert net.correct and net.weight == pytest.approx(0.1)
    # three continuations: 0.9, capped at 0.4
    (capped,) = interpret_feedback([rec("b", K.CONTINUED_RECOMMENDATION, ts=t) for t in range(3)])
    assert capped.weight == pytest.approx(0.4)
    # custom weights that cancel exactly give no evidence at all
    cancel = SignalWeights(continued_recommendation=0.2, abandoned_quickly=0.2)
    assert interpret_feedback([rec("c", K.CONTINUED_RECOMMENDATION), rec("c", K.ABANDONED_QUICKLY)], cancel) == []


def test_classify_playback() -> None:
    assert classify_playback(True, 30) is K.ABANDONED_QUICKLY
    assert classify_playback(True, 1800) is K.CONTINUED_RECOMMENDATION
    assert classify_playback(True, 300) is None  # ambiguous middle
    assert classify_playback(False, 30) is None  # not recommended to the predicted person
    assert classify_playback(True, 100, PlaybackThresholds(abandon_within_s=60, continue_after_s=90)) is K.CONTINUED_RECOMMENDATION
    with pytest.raises(InvalidArgument):
        classify_playback(True, float("nan"))


def test_align_evidence_feeds_metrics() -> None:
    records = [
        rec("x", K.PROFILE_CONFIRMED, "p2", predicted="p2"),
        rec("y", K.PROFILE_SWITCHED, "p9", predicted="p1"),  # p9 is not in y's vector: label unknown
        rec("z", K.ABANDONED_QUICKLY, predicted="p1"),
        rec("ghost", K.PROFILE_CONFIRMED, "p1"),
    ]
    aligned = align_evidence(interpret_feedback(records), ["x", "y", "z"], [["p1", "p2"], ["p1", "p2"], ["p1"]])
    np.testing.assert_array_equal(aligned.rows, [0, 1, 2])
    np.testing.assert_array_equal(aligned.labels, [1, UNKNOWN_LABEL, UNKNOWN_LABEL])
    np.testing.assert_array_equal(aligned.correct, [1, 0, 0])
    np.testing.assert_allclose(aligned.weights, [1.0, 0.8, 0.2])
    assert aligned.unmatched == 1
    probs = np.array([[0.3, 0.7], [0.6, 0.4], [1.0, 0.0]])
    summary = calibration_summary(probs[aligned.rows], aligned.labels, aligned.correct, aligned.weights)
    # Weighted accuracy: 1.0 / (1.0 + 0.8 + 0.2) = 0.5
    assert summary.accuracy == pytest.approx(0.5)
    assert summary.n_labeled == 1


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: rec("a", K.PROFILE_CONFIRMED), "person"),
        (lambda: rec("a", K.ABANDONED_QUICKLY, "p1"), "person"),
        (lambda: rec("", K.ABANDONED_QUICKLY), "prediction_id"),
        (lambda: FeedbackRecord("a", "liked", "p1"), "kind"),  # type: ignore[arg-type]
        (lambda: SignalWeights(profile_hint=1.5), "profile_hint"),
        (lambda: interpret_feedback([rec("a", K.ABANDONED_QUICKLY, predicted="p1"), rec("a", K.ABANDONED_QUICKLY, predicted="p2")]), "predicted_person"),
        (lambda: align_evidence([], ["a", "a"], [["p1"], ["p1"]]), "prediction_ids"),
    ],
)
def test_bad_records_name_the_field(make, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as info:
        make()
    assert info.value.field == field


def test_string_kind_is_accepted() -> None:
    assert FeedbackRecord("a", "profile_hint", "p1", "p1").kind is K.PROFILE_HINT  # type: ignore[arg-type]
