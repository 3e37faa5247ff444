"""Pure pieces of the feedback benchmark: sample feedback, recalibrate, report before/after.

The scenario ``evaluate_recalibration`` reproduces: the service makes predictions
(probability vectors over a household's persons, from one of several model
variants); for a small random fraction of them (``feedback_rate``, default 3.75 %)
the true person becomes known through feedback. One calibrator per variant is fitted
on that variant's feedback sample (variants are different models and miscalibrate
differently), and every metric is then reported on the *other* predictions, whose
labels the calibrator never saw: before and after recalibration, pooled, per variant
and per cohort, with reliability tables.

``synthetic_stream`` makes a miscalibrated stream with known truth for tests and
the quick benchmark; the real benchmark feeds clustering output instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.metrics import (
    DEFAULT_BINS,
    CalibrationSummary,
    FloatArray,
    IntArray,
    as_labels,
    as_probability_matrix,
    calibration_summary,
    cohort_labels,
    reliability_table,
)
from services.feedback.domain.recalibration import Calibrator, Criterion, FeedbackSample, fit_calibrator

DEFAULT_FEEDBACK_RATE = 0.0375


# ----------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class SyntheticStream:
    """Predictions with known truth: padded ``probs`` (n, 5), ``labels``, ``variants``, ``cohorts``,
    plus the ``true_probs`` the labels were drawn from (perfectly calibrated by construction)."""

    probs: FloatArray
    true_probs: FloatArray
    labels: IntArray
    variants: NDArray[np.str_]
    cohorts: NDArray[np.str_]
    household_size: IntArray
    cold_start: NDArray[np.bool_]


def synthetic_stream(
    n: int,
    seed: int = 0,
    variant_distortion: Mapping[str, float] | None = None,
    cold_start_rate: float = 0.1,
    cold_start_distortion: float = 0.8,
    max_household: int = 5,
    concentration: float = 0.3,
) -> SyntheticStream:
    """A stream whose reported probabilities are distorted versions of the truth.

    Per row: household size K uniform in 1..``max_household``; true vector q ~
    Dirichlet(``concentration``) over K persons; label ~ q. The model reports
    p = softmax(ln q / d) where d is the variant's distortion (< 1 over-confident,
    > 1 under-confident, 1 calibrated); cold-start rows multiply d by
    ``cold_start_distortion`` (new households are the worst calibrated). Variants are
    assigned uniformly; default ``{"kmeans": 0.55, "gmm": 0.8}``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgument("n", f"must be an integer >= 1, got {n!r}")
    distortion = dict(variant_distortion or {"kmeans": 0.55, "gmm": 0.8})
    if not distortion or any(not np.isfinite(d) or d <= 0 for d in distortion.values()):
        raise InvalidArgument("variant_distortion", "must map at least one variant to a distortion > 0")
    if not 0.0 <= cold_start_rate <= 1.0:
        raise InvalidArgument("cold_start_rate", "must lie in [0, 1]")
    if not cold_start_distortion > 0:
        raise InvalidArgument("cold_start_distortion", "must be > 0")
    if max_household < 1:
        raise InvalidArgument("max_household", "must be >= 1")
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_household + 1, size=n)
    present = np.arange(max_household)[np.newaxis, :] < sizes[:, np.newaxis]
    # Dirichlet as normalised gammas, restricted to the household's persons.
    gammas = np.where(present, rng.gamma(concentration, size=(n, max_household)), 0.0)
    gammas = np.where(present, np.maximum(gammas, 1e-12), 0.0)
    true_probs = gammas / gammas.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(true_probs, axis=1)
    labels = np.minimum((rng.random(n)[:, np.newaxis] > cumulative).sum(axis=1), sizes - 1)
    names = np.array(sorted(distortion))
    variants = names[rng.integers(0, names.size, size=n)]
    cold = rng.random(n) < cold_start_rate
    d = np.array([distortion[v] for v in names])[np.searchsorted(names, variants)]
    d = np.where(cold, d * cold_start_distortion, d)
    log_q = np.where(present, np.log(np.where(present, true_probs, 1.0)), -np.inf) / d[:, np.newaxis]
    log_q -= log_q.max(axis=1, keepdims=True)
    probs = np.exp(log_q)
    probs /= probs.sum(axis=1, keepdims=True)
    return SyntheticStream(
        probs=probs,
        true_probs=true_probs,
        labels=labels.astype(np.int64),
        variants=variants,
        cohorts=cohort_labels(sizes, cold),
        household_size=sizes.astype(np.int64),
        cold_start=cold,
    )


# ----------------------------------------------------------------------------- evaluation


def feedback_mask(n: int, feedback_rate: float = DEFAULT_FEEDBACK_RATE, seed: int = 0) -> NDArray[np.bool_]:
    """Uniform random choice of round(rate * n) rows (at least one when rate > 0) that get feedback."""
    if not 0.0 < feedback_rate < 1.0:
        raise InvalidArgument("feedback_rate", f"must lie in (0, 1), got {feedback_rate!r}")
    if n < 2:
        raise InvalidArgument("n", "needs at least two predictions (one for feedback, one held out)")
    size = min(n - 1, max(1, round(feedback_rate * n)))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=size, replace=False)] = True
    return mask


def _metrics_dict(summary: CalibrationSummary) -> dict[str, Any]:
    return {
        "n": summary.n,
        "brier": summary.brier,
        "ece": summary.ece,
        "ece_equal_mass": summary.ece_equal_mass,
        "multiclass_brier": summary.multiclass_brier,
        "log_loss": summary.log_loss,
        "accuracy": summary.accuracy,
        "mean_confidence": summary.mean_confidence,
    }


def evaluate_recalibration(
    probs: ArrayLike,
    labels: ArrayLike,
    variants: ArrayLike,
    cohorts: ArrayLike | None = None,
    predicted: ArrayLike | None = None,
    feedback_rate: float = DEFAULT_FEEDBACK_RATE,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
    criterion: Criterion = "ece",
    methods: Sequence[str] = ("identity", "temperature", "isotonic"),
) -> dict[str, Any]:
    """Fit per-variant calibrators on a feedback sample and report metrics on the rest.

    Returns a JSON-friendly dict with the bench-feedback keys ``feedback_rate``,
    ``before``/``after`` ({brier, ece, ...} on held-out rows, pooled), ``by_variant``
    ({variant: {n_feedback, n_holdout, calibrator, before, after}}), plus ``by_cohort``,
    ``reliability`` ({"before": rows, "after": rows}, equal-width bins), ``n_feedback``
    and ``n_holdout``. ``predicted``, if given, must name a most-probable person per row.
    """
    matrix = as_probability_matrix(probs)
    n = matrix.shape[0]
    truth = as_labels(labels, n, matrix.shape[1])
    variant_names = np.asarray(variants).astype(str)
    if variant_names.shape != (n,):
        raise InvalidArgument("variants", f"must be a 1-D array of length {n}")
    cohort_names = np.full(n, "all") if cohorts is None else np.asarray(cohorts).astype(str)
    if cohort_names.shape != (n,):
        raise InvalidArgument("cohorts", f"must be a 1-D array of length {n}")
    if predicted is not None:
        chosen = as_labels(predicted, n, matrix.shape[1], field="predicted")
        if np.any(matrix[np.arange(n), chosen] < matrix.max(axis=1)):
            raise InvalidArgument("predicted", "must be the most probable person of each row")
    in_feedback = feedback_mask(n, feedback_rate, seed)
    held_out = ~in_feedback

    calibrated = matrix.copy()
    by_variant: dict[str, Any] = {}
    for variant in sorted(set(variant_names.tolist())):
        rows = variant_names == variant
        train, test = rows & in_feedback, rows & held_out
        if train.any():
            calibrator = fit_calibrator(
                FeedbackSample.create(matrix[train], labels=truth[train]), version=1, methods=methods,
                criterion=criterion, n_bins=n_bins, seed=seed,
            )
        else:
            calibrator = Calibrator(1, "identity", {}, {"n": 0, "reason": "no feedback for this variant"})
        calibrated[rows] = calibrator.apply(matrix[rows])
        entry: dict[str, Any] = {
            "n_feedback": int(train.sum()),
            "n_holdout": int(test.sum()),
            "calibrator": calibrator.to_dict(),
        }
        if test.any():
            entry["before"] = _metrics_dict(calibration_summary(matrix[test], truth[test], n_bins=n_bins))
            entry["after"] = _metrics_dict(calibration_summary(calibrated[test], truth[test], n_bins=n_bins))
        by_variant[variant] = entry

    by_cohort: dict[str, Any] = {}
    for cohort in sorted(set(cohort_names[held_out].tolist())):
        rows = held_out & (cohort_names == cohort)
        by_cohort[cohort] = {
            "before": _metrics_dict(calibration_summary(matrix[rows], truth[rows], n_bins=n_bins)),
            "after": _metrics_dict(calibration_summary(calibrated[rows], truth[rows], n_bins=n_bins)),
        }

    before_probs, after_probs, test_truth = matrix[held_out], calibrated[held_out], truth[held_out]
    rows = np.arange(test_truth.size)

    def table(p: FloatArray) -> list[dict[str, Any]]:
        predicted_rows = np.argmax(p, axis=1)
        correct = (predicted_rows == test_truth).astype(np.float64)
        return reliability_table(p[rows, predicted_rows], correct, n_bins=n_bins).to_records()

    return {
        "feedback_rate": feedback_rate,
        "n_feedback": int(in_feedback.sum()),
        "n_holdout": int(held_out.sum()),
        "before": _metrics_dict(calibration_summary(before_probs, test_truth, n_bins=n_bins)),
        "after": _metrics_dict(calibration_summary(after_probs, test_truth, n_bins=n_bins)),
        "by_variant": by_variant,
        "by_cohort": by_cohort,
        "reliability": {"before": table(before_probs), "after": table(after_probs)},
    }
