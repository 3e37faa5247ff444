"""Calibration metrics: against scikit-learn where comparable, by hand where not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss
from sklearn.metrics import log_loss as sk_log_loss

from services.common.errors import InvalidArgument  # the feedback domain raises it or its subclass
from services.feedback.domain.metrics import (
    UNKNOWN_LABEL,
    binary_brier,
    calibration_summary,
    cohort_labels,
    correctness,
    expected_calibration_error,
    log_loss,
    multiclass_brier,
    pad_probabilities,
    reliability_table,
    summaries_by_group,
    top_label,
    top_label_brier,
)


def random_probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.dirichlet(np.full(k, 0.7), size=n)


# ----------------------------------------------------------------------------- vs scikit-learn


def test_binary_brier_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    conf = rng.random(500)
    correct = (rng.random(500) < conf).astype(float)
    weights = rng.random(500) + 0.1
    assert binary_brier(conf, correct) == pytest.approx(brier_score_loss(correct, conf))
    assert binary_brier(conf, correct, weights) == pytest.approx(brier_score_loss(correct, conf, sample_weight=weights))


def test_top_label_brier_is_binary_brier_of_correctness() -> None:
    rng = np.random.default_rng(2)
    probs = random_probs(rng, 300, 4)
    labels = rng.integers(0, 4, 300)
    predicted = probs.argmax(axis=1)
    expected = brier_score_loss((predicted == labels).astype(int), probs.max(axis=1))
    assert top_label_brier(probs, labels) == pytest.approx(expected)


def test_multiclass_brier_matches_sklearn_unhalved() -> None:
    rng = np.random.default_rng(3)
    probs = random_probs(rng, 400, 5)
    labels = rng.integers(0, 5, 400)
    weights = rng.random(400) + 0.5
    expected = brier_score_loss(labels, probs, labels=list(range(5)), scale_by_half=False)
    assert multiclass_brier(probs, labels) == pytest.approx(expected)
    expected_w = brier_score_loss(labels, probs, labels=list(range(5)), scale_by_half=False, sample_weight=weights)
    assert multiclass_brier(probs, labels, weights) == pytest.approx(expected_w)


def test_log_loss_matches_sklearn() -> None:
    rng = np.random.default_rng(4)
    probs = random_probs(rng, 400, 3)
    probs = np.clip(probs, 1e-6, None)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, 400)
    weights = rng.random(400) + 0.5
    assert log_loss(probs, labels) == pytest.approx(sk_log_loss(labels, probs, labels=[0, 1, 2]))
    assert log_loss(probs, labels, weights) == pytest.approx(sk_log_loss(labels, probs, labels=[0, 1, 2], sample_weight=weights))


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_table_matches_calibration_curve(strategy: str) -> None:
    rng = np.random.default_rng(5)
    conf = rng.beta(5, 2, 2000)
    correct = (rng.random(2000) < conf**1.5).astype(int)
    table = reliability_table(conf, correct, n_bins=10, strategy=strategy)  # type: ignore[arg-type]
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=10, strategy=strategy)
    filled = table.count > 0
    np.testing.assert_allclose(table.accuracy[filled], prob_true)
    np.testing.assert_allclose(table.mean_confidence[filled], prob_pred)
    assert table.count.sum() == 2000
    if strategy == "quantile":
        # Equal mass: every bin holds 200 +- 1 predictions.
        assert np.all(np.abs(table.count - 200) <= 1)


# ----------------------------------------------------------------------------- by hand


def test_ece_equal_width_by_hand() -> None:
    # 2 bins, edges 0, 0.5, 1.
    # bin (0, 0.5]: conf 0.1, 0.35, 0.4 -> mean 0.85/3 = 0.28333; correct 0, 1, 0 -> acc 1/3; |gap| = 0.05
    # bin (0.5, 1]: conf 0.8, 0.9 -> mean 0.85; correct 1, 1 -> acc 1; |gap| = 0.15
    # ECE = 3/5 * 0.05 + 2/5 * 0.15 = 0.03 + 0.06 = 0.09
    conf = [0.1, 0.35, 0.4, 0.8, 0.9]
    correct = [0, 1, 0, 1, 1]
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.09)
    table = reliability_table(conf, correct, n_bins=2)
    np.testing.assert_allclose(table.count, [3, 2])
    np.testing.assert_allclose(table.gap, [1 / 3 - 0.85 / 3, 0.15])


def test_ece_equal_mass_differs_from_equal_width_by_hand() -> None:
    conf = [0.55, 0.6, 0.65, 0.95]
    correct = [1, 0, 1, 1]
    # Equal width, 2 bins: all four in (0.5, 1]; mean conf 2.75/4 = 0.6875, acc 3/4 -> ECE 0.0625.
    assert expected_calibration_error(conf, correct, n_bins=2, strategy="uniform") == pytest.approx(0.0625)
    # Equal mass, 2 bins: median (0.6 + 0.65)/2 = 0.625.
    # {0.55, 0.6}: conf 0.575, acc 0.5, |gap| 0.075; {0.65, 0.95}: conf 0.8, acc 1, |gap| 0.2
    # ECE = 0.5 * 0.075 + 0.5 * 0.2 = 0.1375
    assert expected_calibration_error(conf, correct, n_bins=2, strategy="quantile") == pytest.approx(0.1375)


def test_value_on_an_edge_goes_to_the_bin_it_closes() -> None:
    table = reliability_table([0.5, 0.0, 1.0], [1, 0, 1], n_bins=2)
    # (0, 0.5] holds 0.5 and (as the first bin) 0.0; (0.5, 1] holds 1.0.
    np.testing.assert_array_equal(table.count, [2, 1])


def test_weighted_ece_and_brier_by_hand() -> None:
    # One bin; weights 3 and 1: mean conf (3*0.2 + 0.8)/4 = 0.35, accuracy 0 -> ECE 0.35.
    # Brier (3 * 0.2^2 + 1 * 0.8^2)/4 = (0.12 + 0.64)/4 = 0.19.
    assert expected_calibration_error([0.2, 0.8], [0, 0], [3, 1], n_bins=1) == pytest.approx(0.35)
    assert binary_brier([0.2, 0.8], [0, 0], [3, 1]) == pytest.approx(0.19)


def test_empty_bins_are_reported_as_nan_and_ignored_by_ece() -> None:
    table = reliability_table([0.95, 0.97], [1, 1], n_bins=10)
    assert table.n_bins == 10
    assert np.isnan(table.accuracy[:9]).all() and table.count[:9].sum() == 0
    assert table.ece == pytest.approx(1 - 0.96)
    records = table.to_records()
    assert records[0]["accuracy"] is None and records[9]["count"] == 2


def test_all_equal_confidences_give_one_quantile_bin() -> None:
    table = reliability_table([0.7] * 4, [1, 1, 0, 1], n_bins=5, strategy="quantile")
    assert table.n_bins == 1
    assert table.ece == pytest.approx(0.05)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(0, 1), st.booleans(), st.integers(1, 4)), min_size=1, max_size=40
    ),
    n_bins=st.integers(1, 12),
)
def test_integer_weights_equal_repeated_rows(data: list[tuple[float, bool, int]], n_bins: int) -> None:
    conf = np.array([d[0] for d in data])
    correct = np.array([float(d[1]) for d in data])
    weights = np.array([d[2] for d in data])
    repeated_conf, repeated_correct = np.repeat(conf, weights), np.repeat(correct, weights)
    assert expected_calibration_error(conf, correct, weights, n_bins) == pytest.approx(
        expected_calibration_error(repeated_conf, repeated_correct, None, n_bins), abs=1e-12
    )
    assert binary_brier(conf, correct, weights) == pytest.approx(binary_brier(repeated_conf, repeated_correct), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    conf=st.lists(st.floats(0, 1), min_size=1, max_size=50),
    seed=st.integers(0, 1000),
    n_bins=st.integers(1, 20),
    strategy=st.sampled_from(["uniform", "quantile"]),
)
def test_ece_bounds(conf: list[float], seed: int, n_bins: int, strategy: str) -> None:
    correct = np.random.default_rng(seed).random(len(conf)) < 0.5
    ece = expected_calibration_error(conf, correct, n_bins=n_bins, strategy=strategy)  # type: ignore[arg-type]
    # ECE lies between the 1-bin value |mean conf - acc| (a coarser partition can only cancel more)
    # and the mean absolute error.
    one_bin = abs(np.mean(conf) - np.mean(correct))
    assert one_bin - 1e-12 <= ece <= np.mean(np.abs(np.asarray(conf) - correct)) + 1e-12


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), extra=st.integers(0, 3))
def test_zero_padding_changes_no_metric(seed: int, k: int, extra: int) -> None:
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, 20, k)
    labels = rng.integers(0, k, 20)
    padded = np.hstack([probs, np.zeros((20, extra))])
    assert multiclass_brier(padded, labels) == pytest.approx(multiclass_brier(probs, labels))
    assert log_loss(padded, labels) == pytest.approx(log_loss(probs, labels))
    assert top_label_brier(padded, labels) == pytest.approx(top_label_brier(probs, labels))


# ----------------------------------------------------------------------------- helpers and groups


def test_pad_probabilities_and_top_label() -> None:
    probs = pad_probabilities([[1.0], [0.2, 0.8], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(probs, [[1, 0, 0], [0.2, 0.8, 0], [0.5, 0.5, 0]])
    predicted, confidence = top_label(probs)
    np.testing.assert_array_equal(predicted, [0, 1, 0])  # tie goes to the lowest index
    np.testing.assert_allclose(confidence, [1.0, 0.8, 0.5])
    np.testing.assert_array_equal(correctness(probs, [0, 0, 0]), [1, 0, 1])


def test_summary_uses_labels_where_known_and_correctness_elsewhere() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, UNKNOWN_LABEL, 0])
    correct = np.array([1.0, 0.0, 0.0])
    summary = calibration_summary(probs, labels, correct)
    assert summary.n == 3 and summary.n_labeled == 2
    assert summary.accuracy == pytest.approx(1 / 3)
    # Top-label Brier on all three: (0.1^2 + 0.6^2 + 0.7^2)/3
    assert summary.brier == pytest.approx((0.01 + 0.36 + 0.49) / 3)
    # Multiclass Brier on the two labelled rows: row 1: 0.1^2*2 = 0.02; row 3: 0.7^2*2 = 0.98
    assert summary.multiclass_brier == pytest.approx(0.5)
    assert summary.log_loss == pytest.approx((-np.log(0.9) - np.log(0.3)) / 2)
    with pytest.raises(InvalidArgument, match="correct"):
        calibration_summary(probs, labels, [0.0, 0.0, 0.0])  # row 0 label says right


def test_summaries_by_group_equal_individual_summaries() -> None:
    rng = np.random.default_rng(7)
    probs = random_probs(rng, 200, 3)
    labels = rng.integers(0, 3, 200)
    groups = np.where(rng.random(200) < 0.3, "gmm", "kmeans")
    by_group = summaries_by_group(groups, probs, labels)
    assert list(by_group) == ["gmm", "kmeans"]
    for name in by_group:
        rows = groups == name
        assert by_group[name].n == rows.sum()
        assert by_group[name].ece == pytest.approx(expected_calibration_error(probs[rows].max(1), correctness(probs[rows], labels[rows])))
        assert by_group[name].multiclass_brier == pytest.approx(multiclass_brier(probs[rows], labels[rows]))


def test_cohort_labels() -> None:
    names = cohort_labels(np.array([1, 3, 7]), np.array([True, False, False]))
    assert names.tolist() == ["size=1/cold", "size=3/warm", "size=5+/warm"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: multiclass_brier([[0.5, 0.6]], [0]), "probs"),
        (lambda: multiclass_brier([[np.nan, 1.0]], [0]), "probs"),
        (lambda: multiclass_brier([[0.5, 0.5]], [2]), "labels"),
        (lambda: multiclass_brier([[0.5, 0.5]], [0.5]), "labels"),
        (lambda: multiclass_brier(np.zeros((0, 2)), []), "probs"),
        (lambda: binary_brier([], []), "confidence"),
        (lambda: binary_brier([1.2], [1]), "confidence"),
        (lambda: binary_brier([0.5], [1], [0.0]), "weights"),
        (lambda: binary_brier([0.5], [1], [-1.0]), "weights"),
        (lambda: binary_brier([0.5, 0.2], [1]), "correct"),
        (lambda: expected_calibration_error([0.5], [1], n_bins=0), "n_bins"),
        (lambda: expected_calibration_error([0.5], [1], strategy="log"), "strategy"),  # type: ignore[arg-type]
        (lambda: calibration_summary([[1.0]]), "labels"),
        (lambda: summaries_by_group(["a"], [[0.5, 0.5], [0.5, 0.5]], [0, 1]), "groups"),
    ],
)
def test_bad_input_names_the_field(call, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, InvalidArgument)
    assert info.value.field == field


def test_domain_errors_map_to_invalid_argument_status() -> None:
    import grpc

    from services.common.errors import status_for

    with pytest.raises(InvalidArgument) as info:
        binary_brier([2.0], [1.0])
    assert status_for(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value).startswith("confidence: ")
