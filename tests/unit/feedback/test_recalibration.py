"""Recalibration: temperature and isotonic fits, choice by cross-validation, calibrator JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument  # the feedback domain raises it or its subclass
from services.feedback.domain.evaluation import synthetic_stream
from services.feedback.domain.metrics import UNKNOWN_LABEL, correctness, expected_calibration_error
from services.feedback.domain.recalibration import (
    Calibrator,
    FeedbackSample,
    apply_temperature,
    apply_top_label_map,
    fit_calibrator,
    fit_temperature,
)


def held_out_ece(calibrator: Calibrator, probs: np.ndarray, labels: np.ndarray) -> float:
    calibrated = calibrator.apply(probs)
    return expected_calibration_error(calibrated.max(axis=1), correctness(calibrated, labels))


@pytest.mark.parametrize("distortion", [0.5, 1.8])  # over-confident, under-confident
def test_recalibration_lowers_held_out_ece(distortion: float) -> None:
    stream = synthetic_stream(30_000, seed=11, variant_distortion={"m": distortion}, cold_start_rate=0.2)
    train, test = slice(0, 1500), slice(1500, None)  # 5 % feedback; the rest is never seen
    sample = FeedbackSample.create(stream.probs[train], labels=stream.labels[train])
    calibrator = fit_calibrator(sample, version=3)
    before = held_out_ece(Calibrator(0, "identity"), stream.probs[test], stream.labels[test])
    after = held_out_ece(calibrator, stream.probs[test], stream.labels[test])
    assert calibrator.method in ("temperature", "isotonic") and calibrator.version == 3
    assert before > 0.04
    assert after < 0.5 * before
    # Recalibration must not change who we say was watching.
    np.testing.assert_array_equal(calibrator.apply(stream.probs).argmax(1), stream.probs.argmax(1))


def test_temperature_recovers_the_distortion() -> None:
    # Reported p = softmax(ln q / d) with q calibrated; softmax(ln p / T) = q exactly when T = 1/d,
    # so the likelihood is maximised near T = 2 for d = 0.5.
    stream = synthetic_stream(20_000, seed=3, variant_distortion={"m": 0.5}, cold_start_rate=0.0)
    labelled = FeedbackSample.create(stream.probs, labels=stream.labels)
    assert fit_temperature(labelled) == pytest.approx(2.0, rel=0.08)
    # Right/wrong feedback alone (no label) identifies the same temperature, less sharply.
    coarse = FeedbackSample.create(stream.probs, correct=correctness(stream.probs, stream.labels))
    assert fit_temperature(coarse) == pytest.approx(2.0, rel=0.15)


def test_mixed_labels_and_correctness_are_accepted() -> None:
    stream = synthetic_stream(4000, seed=5, variant_distortion={"m": 0.6}, cold_start_rate=0.0)
    labels = stream.labels.copy()
    labels[::2] = UNKNOWN_LABEL
    sample = FeedbackSample.create(stream.probs, labels=labels, correct=correctness(stream.probs, stream.labels))
    assert 1.3 < fit_temperature(sample) < 2.1


def test_well_calibrated_stream_is_not_made_worse() -> None:
    stream = synthetic_stream(20_000, seed=8, variant_distortion={"m": 1.0}, cold_start_rate=0.0)
    sample = FeedbackSample.create(stream.probs[:1500], labels=stream.labels[:1500])
    calibrator = fit_calibrator(sample)
    before = held_out_ece(Calibrator(0, "identity"), stream.probs[1500:], stream.labels[1500:])
    after = held_out_ece(calibrator, stream.probs[1500:], stream.labels[1500:])
    assert after <= before + 0.01


def test_too_few_samples_keep_the_identity() -> None:
    sample = FeedbackSample.create([[0.9, 0.1]] * 10, labels=[1] * 10)
    calibrator = fit_calibrator(sample, version=7)
    assert calibrator.method == "identity" and calibrator.version == 7
    assert "too few" in calibrator.training["reason"]


vectors = st.integers(1, 6).flatmap(
    lambda k: st.lists(st.lists(st.floats(0, 1), min_size=k, max_size=k), min_size=1, max_size=20)
)


def normalise(rows: list[list[float]]) -> np.ndarray:
    probs = np.asarray(rows) + 1e-3 * (np.asarray(rows) > 0)
    probs[probs.sum(1) == 0, 0] = 1.0
    return probs / probs.sum(1, keepdims=True)


@settings(max_examples=80, deadline=None)
@given(rows=vectors, temperature=st.floats(0.05, 20))
def test_temperature_keeps_argmax_zeros_and_sums(rows: list[list[float]], temperature: float) -> None:
    probs = normalise(rows)
    out = apply_temperature(probs, temperature)
    np.testing.assert_allclose(out.sum(1), 1.0)
    np.testing.assert_array_equal(out[probs == 0], 0.0)
    np.testing.assert_array_equal(out.argmax(1), probs.argmax(1))


@settings(max_examples=80, deadline=None)
@given(rows=vectors, knots=st.lists(st.floats(0, 1), min_size=2, max_size=6))
def test_top_label_map_keeps_argmax_zeros_and_sums(rows: list[list[float]], knots: list[float]) -> None:
    probs = normalise(rows)
    x = np.linspace(0, 1, len(knots))
    y = np.sort(knots)
    out = apply_top_label_map(probs, x, y)
    np.testing.assert_allclose(out.sum(1), 1.0)
    np.testing.assert_array_equal(out[probs == 0], 0.0)
    np.testing.assert_array_equal(out.argmax(1), probs.argmax(1))
    # Where the map's target is attainable, the top probability is exactly it.
    target = np.interp(probs.max(1), x, y)
    runner = np.sort(probs, axis=1)[:, -2] if probs.shape[1] > 1 else np.zeros(len(probs))
    floor = runner / (1 - probs.max(1) + runner + 1e-300)
    free = (target > floor + 1e-6) & (probs.max(1) < 1 - 1e-9)
    np.testing.assert_allclose(out.max(1)[free], target[free], rtol=1e-9)


def test_isotonic_others_keep_their_proportions() -> None:
    probs = np.array([[0.6, 0.3, 0.1]])
    out = apply_top_label_map(probs, np.array([0.0, 1.0]), np.array([0.0, 0.8]))  # 0.6 -> 0.48
    np.testing.assert_allclose(out, [[0.48, 0.39, 0.13]])  # 0.52 shared 3 : 1


@pytest.mark.parametrize("method", ["identity", "temperature", "isotonic"])
def test_calibrator_json_round_trip(method: str) -> None:
    stream = synthetic_stream(3000, seed=2, variant_distortion={"m": 0.6})
    sample = FeedbackSample.create(stream.probs, labels=stream.labels)
    forced = fit_calibrator(sample, version=4, methods=(method,))  # a single candidate is always chosen
    assert forced.method == method
    text = forced.to_json()
    restored = Calibrator.from_json(text)
    assert restored == forced
    assert json.loads(text)["version"] == 4
    np.testing.assert_array_equal(restored.apply(stream.probs), forced.apply(stream.probs))
    single = restored.apply(stream.probs[0])
    assert single.ndim == 1 and single.shape == stream.probs[0].shape


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{", "calibrator"),
        ('{"schema": 2, "version": 1, "method": "identity"}', "schema"),
        ('{"schema": 1, "method": "identity"}', "version"),
        ('{"schema": 1, "version": 1, "method": "platt"}', "method"),
        ('{"schema": 1, "version": 1, "method": "temperature", "parameters": {"temperature": -1}}', "parameters.temperature"),
        ('{"schema": 1, "version": 1, "method": "isotonic", "parameters": {"x": [0.5, 0.2], "y": [0.1, 0.2]}}', "parameters.x"),
        ('{"schema": 1, "version": 1, "method": "isotonic", "parameters": {"x": [0.2, 0.5], "y": [0.3, 0.2]}}', "parameters.y"),
    ],
)
def test_bad_calibrator_json_names_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Calibrator.from_json(text)
    assert info.value.field == field


def test_bad_fit_arguments() -> None:
    sample = FeedbackSample.create([[0.6, 0.4]] * 60, labels=[0, 1] * 30)
    with pytest.raises(InvalidArgument, match="methods"):
        fit_calibrator(sample, methods=("platt",))
    with pytest.raises(InvalidArgument, match="criterion"):
        fit_calibrator(sample, criterion="auc")  # type: ignore[arg-type]
    assert fit_calibrator(sample, criterion="nll").method in ("identity", "temperature", "isotonic")


def test_a_one_person_row_may_leave_mass_for_an_unseen_member_and_is_not_recalibrated():
    # Clustering's one-person model answers 0.85, not 1.0 (docs/clustering.md); a calibrator
    # fitted on multi-person households must neither refuse it nor push it back to 1.0.
    hot = Calibrator(1, "temperature", {"temperature": 0.5})
    assert hot.apply(np.array([[0.85]])).tolist() == [[0.85]]
    assert hot.apply(np.array([0.85])).tolist() == [0.85]
    # Two or more persons: still a distribution, and a one-person row cannot exceed 1.
    with pytest.raises(InvalidArgument, match="sums to 0.85"):
        hot.apply(np.array([[0.5, 0.35]]))
    with pytest.raises(InvalidArgument, match="must lie in \\[0, 1\\]"):
        hot.apply(np.array([[1.2]]))
    # A two-person row is still recalibrated (T < 1 sharpens).
    assert hot.apply(np.array([[0.7, 0.3]]))[0, 0] > 0.7
