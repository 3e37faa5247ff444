"""Evaluation helpers for the feedback benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.evaluation import evaluate_recalibration, feedback_mask, synthetic_stream
from services.feedback.domain.metrics import correctness, expected_calibration_error


def test_synthetic_stream_shape_and_truth() -> None:
    s = synthetic_stream(20_000, seed=4)
    assert s.probs.shape == (20_000, 5)
    np.testing.assert_allclose(s.probs.sum(1), 1.0)
    # Nobody outside the household: columns beyond its size are zero, labels inside it.
    beyond = np.arange(5)[None, :] >= s.household_size[:, None]
    assert np.all(s.probs[beyond] == 0) and np.all(s.labels < s.household_size)
    # Labels are drawn from true_probs, so those are calibrated up to sampling noise...
    truth_ece = expected_calibration_error(s.true_probs.max(1), correctness(s.true_probs, s.labels))
    assert truth_ece < 0.02
    # ...while the reported (distorted, over-confident) ones are not.
    assert expected_calibration_error(s.probs.max(1), correctness(s.probs, s.labels)) > 0.05
    assert set(np.unique(s.variants)) == {"gmm", "kmeans"}
    assert abs(s.cold_start.mean() - 0.1) < 0.01


def test_feedback_mask() -> None:
    mask = feedback_mask(10_000, 0.0375, seed=1)
    assert mask.sum() == 375
    np.testing.assert_array_equal(mask, feedback_mask(10_000, 0.0375, seed=1))
    assert feedback_mask(3, 0.01).sum() == 1  # at least one
    with pytest.raises(InvalidArgument) as info:
        feedback_mask(100, 0.0)
    assert info.value.field == "feedback_rate"
    with pytest.raises(InvalidArgument):
        feedback_mask(1, 0.5)


def test_evaluate_recalibration_improves_held_out_calibration_per_variant() -> None:
    s = synthetic_stream(60_000, seed=9)
    report = evaluate_recalibration(s.probs, s.labels, s.variants, s.cohorts, predicted=s.probs.argmax(1))
    json.dumps(report, allow_nan=False)  # the benchmark prints it as JSON
    assert report["feedback_rate"] == 0.0375
    assert report["n_feedback"] == 2250 and report["n_holdout"] == 57_750
    assert report["after"]["ece"] < 0.5 * report["before"]["ece"]
    assert report["after"]["brier"] < report["before"]["brier"]
    # Recalibration does not change predictions, so accuracy is identical.
    assert report["after"]["accuracy"] == report["before"]["accuracy"]
    for variant in ("gmm", "kmeans"):
        entry = report["by_variant"][variant]
        assert entry["n_feedback"] + entry["n_holdout"] == int(np.sum(s.variants == variant))
        assert entry["after"]["ece"] < entry["before"]["ece"]
        assert entry["calibrator"]["method"] in ("temperature", "isotonic")
    assert set(report["by_cohort"]) == set(np.unique(s.cohorts))
    rows = report["reliability"]["after"]
    assert len(rows) == 15 and sum(r["count"] for r in rows) == report["n_holdout"]


def test_evaluate_recalibration_rejects_bad_input() -> None:
    s = synthetic_stream(200, seed=1)
    wrong = (s.probs.argmax(1) + 1) % 5
    with pytest.raises(InvalidArgument) as info:
        evaluate_recalibration(s.probs, s.labels, s.variants, predicted=wrong)
    assert info.value.field == "predicted"
    with pytest.raises(InvalidArgument) as info:
        evaluate_recalibration(s.probs, s.labels, s.variants[:10])
    assert info.value.field == "variants"


def test_variant_without_feedback_keeps_identity() -> None:
    s = synthetic_stream(400, seed=1, variant_distortion={"a": 0.5})
    variants = np.array(["a"] * 399 + ["rare"])
    report = evaluate_recalibration(s.probs, s.labels, variants, feedback_rate=0.05, seed=3)
    rare = report["by_variant"]["rare"]
    assert rare["calibrator"]["method"] == "identity"
