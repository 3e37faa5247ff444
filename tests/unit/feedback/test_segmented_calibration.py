"""Calibrators per model age: the pooled map, a residual map per segment of the sessions
the model had seen, and the one-person shift (services/common/calibration.py,
fit_segmented_calibrator in services/feedback/domain/recalibration.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.common.calibration import Calibrator, segment_names, segment_of
from services.common.errors import InvalidArgument
from services.feedback.domain.evaluation import synthetic_stream
from services.feedback.domain.metrics import UNKNOWN_LABEL, expected_calibration_error
from services.feedback.domain.recalibration import FeedbackSample, fit_calibrator, fit_segmented_calibrator

YOUNG, MATURE = 20, 400


def _mesh_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Answers as the mesh pools them: young models over-confident (distortion 0.45),
    mature ones under-confident (1.6), and one-person answers saying 0.55 that are right
    90 % of the time (young) or 40 % (mature). Returns probs (padded to 5), labels
    (UNKNOWN where a one-person answer was wrong), correctness and model ages."""
    young = synthetic_stream(n, seed=seed, variant_distortion={"m": 0.45}, cold_start_rate=0.0, max_household=5)
    mature = synthetic_stream(n, seed=seed + 1, variant_distortion={"m": 1.6}, cold_start_rate=0.0, max_household=5)
    rng = np.random.default_rng(seed)
    multi = [(s.probs[s.household_size > 1], s.labels[s.household_size > 1]) for s in (young, mature)]
    ones = n // 4
    one_probs = np.zeros((2 * ones, 5))
    one_probs[:, 0] = 0.55
    one_right = np.concatenate([rng.random(ones) < 0.9, rng.random(ones) < 0.4])
    probs = np.vstack([multi[0][0], multi[1][0], one_probs])
    labels = np.concatenate([multi[0][1], multi[1][1], np.where(one_right, 0, UNKNOWN_LABEL)])
    ages = np.concatenate([np.full(len(multi[0][1]), YOUNG), np.full(len(multi[1][1]), MATURE),
                           np.full(ones, YOUNG), np.full(ones, MATURE)])
    correct = np.concatenate([probs[:len(multi[0][1]) + len(multi[1][1])].argmax(1)
                              == labels[:len(multi[0][1]) + len(multi[1][1])], one_right]).astype(float)
    order = rng.permutation(len(labels))
    return probs[order], labels[order], correct[order], ages[order]


def _ece(calibrator: Calibrator, probs, correct, ages=None) -> float:
    return expected_calibration_error(calibrator.apply(probs, ages).max(axis=1), correct)


def test_a_calibrator_per_model_age_beats_the_pooled_one_out_of_sample():
    probs, labels, correct, ages = _mesh_like(12_000, seed=5)
    fed = slice(0, 1200)           # ~5 % of answers get feedback; the rest is never seen
    held = slice(1200, None)
    sample = FeedbackSample.create(probs[fed], labels=labels[fed], correct=correct[fed])
    pooled = fit_calibrator(sample)
    segmented = fit_segmented_calibrator(sample, ages[fed])
    # Pooled over all answers the errors of the two ages partly cancel bin by bin; per
    # age, the pooled map leaves each far off and the segmented one does not.
    for age in (YOUNG, MATURE):
        rows = ages[held] == age
        p, c, a = probs[held][rows], correct[held][rows], ages[held][rows]
        before = _ece(Calibrator(0, "identity"), p, c)
        after_pooled, after_segmented = _ece(pooled, p, c, a), _ece(segmented, p, c, a)
        assert before > 0.07 and after_pooled > 0.06, (age, before, after_pooled)
        assert after_segmented < 0.6 * after_pooled, (age, before, after_pooled, after_segmented)
    # Over all answers the segmented calibrator scores better on a proper score of the
    # confidence (top-label Brier), which ECE's cancelling bins cannot show.
    def brier(calibrator, a=None):
        return float(np.mean((calibrator.apply(probs[held], a).max(axis=1) - correct[held]) ** 2))
    assert brier(segmented, ages[held]) < brier(pooled) - 0.005
    # The one-person answers got a shift per age: up where they were right 90 % of the
    # time, down where 40 %.
    names = segment_names((60,))
    assert segmented.one_person[names[0]] > 0.25 and segmented.one_person[names[1]] < -0.08
    # Who was watching never changes.
    out = segmented.apply(probs, ages)
    multi = (probs > 0).sum(1) > 1
    np.testing.assert_array_equal(out[multi].argmax(1), probs[multi].argmax(1))
    assert not out[probs == 0].any()                      # padding stays padding


def test_rows_of_unknown_age_get_the_pooled_map_and_the_pooled_one_person_shift():
    probs, labels, correct, ages = _mesh_like(4000, seed=7)
    segmented = fit_segmented_calibrator(FeedbackSample.create(probs, labels=labels, correct=correct), ages)
    pooled_only = Calibrator(1, segmented.method, segmented.parameters)
    multi = (probs > 0).sum(1) > 1
    np.testing.assert_allclose(segmented.apply(probs[multi]), pooled_only.apply(probs[multi]))
    one = probs[~multi][:3]
    np.testing.assert_allclose(segmented.apply(one)[:, 0], 0.55 + segmented.one_person["all"])


def test_segmented_json_round_trips_and_an_older_reader_gets_the_pooled_map():
    probs, labels, correct, ages = _mesh_like(4000, seed=9)
    cal = fit_segmented_calibrator(FeedbackSample.create(probs, labels=labels, correct=correct), ages, version=4)
    again = Calibrator.from_json(cal.to_json())
    np.testing.assert_allclose(again.apply(probs, ages), cal.apply(probs, ages))
    body = json.loads(cal.to_json())
    assert body["schema"] == 1 and body["segment_edges"] == [60] and body["training"]["n_all"] == len(probs)
    # What a reader from before segments kept: schema, version, method, parameters, training.
    old = Calibrator.from_dict({k: body[k] for k in ("schema", "version", "method", "parameters", "training")})
    multi = (probs > 0).sum(1) > 1
    np.testing.assert_allclose(old.apply(probs[multi]), cal.apply(probs[multi]))


def test_too_little_feedback_keeps_every_part_at_identity():
    probs, labels, correct, ages = _mesh_like(400, seed=3)
    cal = fit_segmented_calibrator(FeedbackSample.create(probs[:30], labels=labels[:30], correct=correct[:30]),
                                   ages[:30])
    assert cal.method == "identity" and cal.segments == {}
    # The one-person shift is shrunk toward none by its pseudo-answers.
    assert all(abs(s) < 0.35 for s in cal.one_person.values())


def test_segments_and_their_names():
    assert segment_names((60,)) == ["sessions:0-59", "sessions:60+"]
    assert segment_names((10, 60)) == ["sessions:0-9", "sessions:10-59", "sessions:60+"]
    assert segment_of([0, 1, 59, 60, 1000], (60,)).tolist() == [-1, 0, 0, 1, 1]


@pytest.mark.parametrize("body, field", [
    ({"segment_edges": [60, 30]}, "segment_edges"),
    ({"segment_edges": [60], "segments": {"sessions:0-10": {"method": "identity"}}}, "segments"),
    ({"segment_edges": [60], "one_person": {"sessions:0-59": 2.0}}, "one_person.sessions:0-59"),
    ({"segment_edges": [60], "one_person": {"young": 0.1}}, "one_person"),
    ({"segment_edges": [60], "segments": {"sessions:60+": {"method": "platt"}}}, "method"),
    ({"segments": []}, "segments"),
])
def test_bad_segment_parts_are_refused_naming_the_field(body, field):
    with pytest.raises(InvalidArgument) as err:
        Calibrator.from_dict({"schema": 1, "version": 1, "method": "identity", **body})
    assert err.value.field == field


def test_a_one_person_shift_stays_below_one_and_leaves_certain_rows_alone():
    cal = Calibrator(1, "identity", segment_edges=(60,), one_person={"sessions:0-59": 0.9, "all": -0.2})
    out = cal.apply(np.array([[0.7, 0.0], [1.0, 0.0], [0.7, 0.0], [0.6, 0.4]]), np.array([10, 10, 0, 10]))
    assert out[0, 0] == pytest.approx(0.995) and out[0, 1] == 0.0
    assert out[1].tolist() == [1.0, 0.0]             # a known person (label) is not an estimate
    assert out[2, 0] == pytest.approx(0.5)            # unknown age: the "all" shift
    assert out[3].tolist() == [0.6, 0.4]              # identity map on distributions
    with pytest.raises(InvalidArgument) as err:
        cal.apply(np.array([[0.7, 0.0]]), np.array([1, 2]))
    assert err.value.field == "model_sessions"
