"""Calibration metrics for "who is watching" predictions.

Conventions used throughout the feedback domain
-----------------------------------------------
- ``probs``: an ``(n, K)`` matrix, one probability vector per prediction over the
  household's persons. Households of different sizes are padded with zero columns
  (``pad_probabilities``); a zero column never changes any metric below. Rows must be
  finite, in [0, 1] and sum to 1 within ``ROW_SUM_TOLERANCE``.
- ``labels``: ``(n,)`` integer column index of the true person. Where only part of the
  rows carry a label, ``UNKNOWN_LABEL`` (-1) marks the others.
- The *prediction* is the arg-max of a row (ties go to the lowest index, as
  ``numpy.argmax``); the *confidence* is that maximum probability; ``correct`` is 1.0
  when the predicted person is the true one, else 0.0.
- ``weights``: optional ``(n,)`` non-negative evidence weights (explicit feedback 1.0,
  implicit signals less, see ``signals.py``). Every mean below is a weighted mean
  ``sum(w * x) / sum(w)``; without weights all rows count 1.

Metrics (all lower is better except accuracy)
---------------------------------------------
- ``binary_brier(confidence, correct)`` = mean((confidence - correct)^2), range [0, 1].
  This is the **top-label Brier**: the Brier score of the binary event "the predicted
  person is right", the one to use when feedback tells only right/wrong. It equals
  ``sklearn.metrics.brier_score_loss(correct, confidence)``.
- ``multiclass_brier(probs, labels)`` = mean(sum_k (p_k - [k == label])^2), range
  [0, 2] (not halved, as ``brier_score_loss`` with ``scale_by_half=False``). Needs labels.
- ``log_loss(probs, labels)`` = mean(-ln max(p_label, eps)), natural log.
- ``expected_calibration_error`` (ECE) = sum_b (W_b / W) * |acc_b - conf_b| over
  confidence bins b, where W_b is the weight in the bin, acc_b the weighted accuracy
  and conf_b the weighted mean confidence. Two binnings:
    * ``"uniform"`` (equal width): edges ``linspace(0, 1, n_bins + 1)``;
    * ``"quantile"`` (equal mass): edges at the 0, 1/n, ..., 1 quantiles of the
      confidences (by sample count, not weight); duplicate edges collapse, so heavy
      ties give fewer bins.
  A bin is ``(lower, upper]`` except the first, which also holds its lower edge —
  the convention of Guo et al. (2017) and of ``sklearn.calibration.calibration_curve``.
- Reliability ``gap`` = accuracy - mean confidence: negative means over-confident.

Everything is vectorised (bin statistics are ``np.bincount`` sums); per-group
summaries loop only over the distinct groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.common.calibration import ROW_SUM_TOLERANCE, as_probability_matrix  # noqa: F401  (re-exported)
from services.feedback.domain.errors import InvalidArgument

UNKNOWN_LABEL = -1
LOG_LOSS_EPS = 1e-15
DEFAULT_BINS = 15
BinStrategy = Literal["uniform", "quantile"]
BIN_STRATEGIES: tuple[str, ...] = ("uniform", "quantile")

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


# ----------------------------------------------------------------------------- validation


def as_labels(labels: ArrayLike, n: int, n_classes: int, field: str = "labels", allow_unknown: bool = False) -> IntArray:
    """Validate integer class indices in [0, K) (or ``UNKNOWN_LABEL`` when allowed)."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n:
        raise InvalidArgument(field, f"must be a 1-D array of length {n}, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InvalidArgument(field, "must be integer class indices")
    elif array.dtype.kind not in "iu":
        raise InvalidArgument(field, f"must be integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    low = UNKNOWN_LABEL if allow_unknown else 0
    if array.min() < low or array.max() >= n_classes:
        allowed = f"[{low}, {n_classes})" if not allow_unknown else f"[0, {n_classes}) or {UNKNOWN_LABEL}"
        raise InvalidArgument(field, f"values must lie in {allowed}")
    return array


def as_vector(values: ArrayLike, n: int, field: str, low: float | None = None, high: float | None = None) -> FloatArray:
    """Validate a finite float vector of length ``n`` with optional bounds."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(field, f"must be numeric ({exc})") from None
    if array.ndim != 1 or array.shape[0] != n:
        raise InvalidArgument(field, f"must be a 1-D array of length {n}, got shape {array.shape}")
    if array.size:
        if not np.all(np.isfinite(array)):
            raise InvalidArgument(field, "contains NaN or infinite values")
        if low is not None and array.min() < low:
            raise InvalidArgument(field, f"values must be >= {low}")
        if high is not None and array.max() > high:
            raise InvalidArgument(field, f"values must be <= {high}")
    return array


def as_weights(weights: ArrayLike | None, n: int, field: str = "weights") -> FloatArray:
    """Validate non-negative weights (``None`` means all ones); the total must be positive."""
    if weights is None:
        return np.ones(n, dtype=np.float64)
    array = as_vector(weights, n, field, low=0.0)
    if n and array.sum() <= 0.0:
        raise InvalidArgument(field, "all weights are zero")
    return array


def _require_rows(n: int, field: str) -> None:
    if n == 0:
        raise InvalidArgument(field, "needs at least one prediction (got an empty array)")


def _check_bins(n_bins: int, strategy: str) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InvalidArgument("n_bins", f"must be a positive integer, got {n_bins!r}")
    if strategy not in BIN_STRATEGIES:
        raise InvalidArgument("strategy", f"must be one of {BIN_STRATEGIES}, got {strategy!r}")


# ----------------------------------------------------------------------------- helpers


def pad_probabilities(vectors: Sequence[ArrayLike], n_classes: int | None = None) -> FloatArray:
    """Stack per-household probability vectors of different lengths into one ``(n, K)`` matrix.

    Missing persons get probability 0, which leaves every metric unchanged. ``n_classes``
    defaults to the longest vector.
    """
    rows = [np.asarray(v, dtype=np.float64).ravel() for v in vectors]
    width = max((r.size for r in rows), default=0) if n_classes is None else n_classes
    if rows and width < max(r.size for r in rows):
        raise InvalidArgument("n_classes", f"{width} is smaller than the longest vector")
    matrix = np.zeros((len(rows), width), dtype=np.float64)
    for i, row in enumerate(rows):
        matrix[i, : row.size] = row
    return as_probability_matrix(matrix, "vectors")


def top_label(probs: ArrayLike) -> tuple[IntArray, FloatArray]:
    """Predicted class (arg-max, ties to the lowest index) and its confidence, per row."""
    matrix = as_probability_matrix(probs)
    predicted = np.argmax(matrix, axis=1) if matrix.shape[0] else np.zeros(0, dtype=np.int64)
    confidence = matrix[np.arange(matrix.shape[0]), predicted]
    return predicted.astype(np.int64), confidence


def correctness(probs: ArrayLike, labels: ArrayLike) -> FloatArray:
    """1.0 where the arg-max of the row is the label, else 0.0."""
    predicted, _ = top_label(probs)
    truth = as_labels(labels, predicted.shape[0], np.asarray(probs).shape[-1])
    return (predicted == truth).astype(np.float64)


def _weighted_mean(values: FloatArray, weights: FloatArray) -> float:
    return float(np.dot(values, weights) / weights.sum())


# ----------------------------------------------------------------------------- scores


def binary_brier(confidence: ArrayLike, correct: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Top-label (binary) Brier: weighted mean of (confidence - correct)^2, in [0, 1]."""
    conf = np.asarray(confidence)
    n = conf.shape[0] if conf.ndim == 1 else -1
    conf = as_vector(confidence, n, "confidence", 0.0, 1.0)
    _require_rows(n, "confidence")
    outcome = as_vector(correct, n, "correct", 0.0, 1.0)
    w = as_weights(weights, n)
    return _weighted_mean((conf - outcome) ** 2, w)


def top_label_brier(probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Binary Brier of "the predicted person is right", from full vectors and labels."""
    predicted, confidence = top_label(probs)
    _require_rows(predicted.shape[0], "probs")
    truth = as_labels(labels, predicted.shape[0], np.asarray(probs).shape[-1])
    return binary_brier(confidence, (predicted == truth).astype(np.float64), weights)


def multiclass_brier(probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Multiclass Brier: weighted mean over rows of sum_k (p_k - onehot_k)^2, in [0, 2]."""
    matrix = as_probability_matrix(probs)
    n = matrix.shape[0]
    _require_rows(n, "probs")
    truth = as_labels(labels, n, matrix.shape[1])
    w = as_weights(weights, n)
    # sum_k (p_k - y_k)^2 = sum_k p_k^2 - 2 p_label + 1, without building the one-hot matrix.
    per_row = np.einsum("ij,ij->i", matrix, matrix) - 2.0 * matrix[np.arange(n), truth] + 1.0
    return _weighted_mean(per_row, w)


def log_loss(probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None, eps: float = LOG_LOSS_EPS) -> float:
    """Weighted mean negative log-likelihood of the true label, natural log, p clipped at ``eps``."""
    matrix = as_probability_matrix(probs)
    n = matrix.shape[0]
    _require_rows(n, "probs")
    truth = as_labels(labels, n, matrix.shape[1])
    w = as_weights(weights, n)
    if not 0.0 < eps < 1.0:
        raise InvalidArgument("eps", f"must lie in (0, 1), got {eps}")
    p_true = np.clip(matrix[np.arange(n), truth], eps, 1.0)
    return _weighted_mean(-np.log(p_true), w)


# ----------------------------------------------------------------------------- reliability


@dataclass(frozen=True)
class ReliabilityTable:
    """Per-bin calibration statistics; arrays are aligned, one entry per bin.

    ``lower``/``upper``: bin edges; ``count``: predictions in the bin; ``weight``: their
    total weight; ``mean_confidence``/``accuracy``: weighted means (NaN in an empty bin);
    ``gap`` = accuracy - mean_confidence (negative = over-confident).
    """

    strategy: str
    lower: FloatArray
    upper: FloatArray
    count: IntArray
    weight: FloatArray
    mean_confidence: FloatArray
    accuracy: FloatArray
    gap: FloatArray

    @property
    def n_bins(self) -> int:
        return int(self.lower.shape[0])

    @property
    def ece(self) -> float:
        """Expected calibration error implied by the table (empty bins contribute 0)."""
        total = self.weight.sum()
        filled = self.weight > 0
        return float(np.sum(self.weight[filled] * np.abs(self.gap[filled])) / total)

    @property
    def max_calibration_error(self) -> float:
        """Largest |gap| over non-empty bins (MCE)."""
        filled = self.weight > 0
        return float(np.max(np.abs(self.gap[filled]))) if filled.any() else 0.0

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-friendly rows; NaN (empty bin) becomes ``None``."""

        def clean(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return [
            {
                "bin": i,
                "lower": float(self.lower[i]),
                "upper": float(self.upper[i]),
                "count": int(self.count[i]),
                "weight": float(self.weight[i]),
                "mean_confidence": clean(self.mean_confidence[i]),
                "accuracy": clean(self.accuracy[i]),
                "gap": clean(self.gap[i]),
            }
            for i in range(self.n_bins)
        ]


def bin_edges(confidence: FloatArray, n_bins: int, strategy: str) -> FloatArray:
    """Edges of the confidence bins (see the module docstring for both strategies)."""
    _check_bins(n_bins, strategy)
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    edges = np.unique(np.quantile(confidence, np.linspace(0.0, 1.0, n_bins + 1)))
    # All confidences equal: one degenerate bin [c, c] rather than none.
    return edges if edges.size > 1 else np.array([edges[0], edges[0]])


def reliability_table(
    confidence: ArrayLike,
    correct: ArrayLike,
    weights: ArrayLike | None = None,
    n_bins: int = DEFAULT_BINS,
    strategy: BinStrategy = "uniform",
) -> ReliabilityTable:
    """Reliability table of top-label confidence against correctness (see module docstring)."""
    conf_raw = np.asarray(confidence)
    n = conf_raw.shape[0] if conf_raw.ndim == 1 else -1
    conf = as_vector(confidence, n, "confidence", 0.0, 1.0)
    _require_rows(n, "confidence")
    outcome = as_vector(correct, n, "correct", 0.0, 1.0)
    w = as_weights(weights, n)
    edges = bin_edges(conf, n_bins, strategy)
    n_out = edges.size - 1
    # side="left" on the inner edges puts a value equal to an edge in the bin it closes: (lower, upper].
    bin_ids = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(bin_ids, minlength=n_out).astype(np.int64)
    weight = np.bincount(bin_ids, weights=w, minlength=n_out)
    conf_sum = np.bincount(bin_ids, weights=w * conf, minlength=n_out)
    hit_sum = np.bincount(bin_ids, weights=w * outcome, minlength=n_out)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(weight > 0, conf_sum / weight, np.nan)
        accuracy = np.where(weight > 0, hit_sum / weight, np.nan)
    return ReliabilityTable(
        strategy=strategy,
        lower=edges[:-1].copy(),
        upper=edges[1:].copy(),
        count=count,
        weight=weight,
        mean_confidence=mean_conf,
        accuracy=accuracy,
        gap=accuracy - mean_conf,
    )


def expected_calibration_error(
    confidence: ArrayLike,
    correct: ArrayLike,
    weights: ArrayLike | None = None,
    n_bins: int = DEFAULT_BINS,
    strategy: BinStrategy = "uniform",
) -> float:
    """ECE = sum_b (W_b / W) |acc_b - conf_b| over ``n_bins`` bins of the given strategy."""
    return reliability_table(confidence, correct, weights, n_bins, strategy).ece


# ----------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class CalibrationSummary:
    """All calibration metrics of one set of predictions with feedback.

    ``brier`` is the top-label (binary) Brier and ``ece``/``ece_equal_mass`` are on the
    top-label confidence: they use every row. ``multiclass_brier`` and ``log_loss`` need
    the true label and use only the ``n_labeled`` rows that have one (``None`` if none).
    """

    n: int
    weight: float
    accuracy: float
    mean_confidence: float
    brier: float
    ece: float
    ece_equal_mass: float
    n_labeled: int
    multiclass_brier: float | None
    log_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "weight": self.weight,
            "accuracy": self.accuracy,
            "mean_confidence": self.mean_confidence,
            "brier": self.brier,
            "ece": self.ece,
            "ece_equal_mass": self.ece_equal_mass,
            "n_labeled": self.n_labeled,
            "multiclass_brier": self.multiclass_brier,
            "log_loss": self.log_loss,
        }


def resolve_outcomes(
    matrix: FloatArray, labels: ArrayLike | None, correct: ArrayLike | None
) -> tuple[IntArray, FloatArray]:
    """Labels (with UNKNOWN_LABEL) and correctness from whichever of the two was given.

    Where a row has a label, its correctness is implied by it; a given ``correct`` must
    agree there (a mismatch means the caller joined feedback to the wrong prediction).
    """
    n, k = matrix.shape
    if labels is None and correct is None:
        raise InvalidArgument("labels", "give labels, correct, or both")
    predicted = np.argmax(matrix, axis=1) if n else np.zeros(0, dtype=np.int64)
    truth = (
        np.full(n, UNKNOWN_LABEL, dtype=np.int64)
        if labels is None
        else as_labels(labels, n, k, allow_unknown=correct is not None)
    )
    known = truth != UNKNOWN_LABEL
    implied = (predicted == truth).astype(np.float64)
    if correct is None:
        return truth, implied
    outcome = as_vector(correct, n, "correct", 0.0, 1.0)
    if np.any(outcome[known] != implied[known]):
        bad = int(np.flatnonzero(outcome[known] != implied[known])[0])
        raise InvalidArgument("correct", f"disagrees with labels at labelled row {bad}")
    return truth, outcome


def calibration_summary(
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    correct: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    n_bins: int = DEFAULT_BINS,
) -> CalibrationSummary:
    """Every metric for one set of predictions; give ``labels`` (-1 = unknown), ``correct``, or both."""
    matrix = as_probability_matrix(probs)
    n = matrix.shape[0]
    _require_rows(n, "probs")
    truth, outcome = resolve_outcomes(matrix, labels, correct)
    w = as_weights(weights, n)
    confidence = matrix.max(axis=1)
    known = truth != UNKNOWN_LABEL
    labeled = bool(known.any()) and w[known].sum() > 0
    return CalibrationSummary(
        n=n,
        weight=float(w.sum()),
        accuracy=_weighted_mean(outcome, w),
        mean_confidence=_weighted_mean(confidence, w),
        brier=binary_brier(confidence, outcome, w),
        ece=expected_calibration_error(confidence, outcome, w, n_bins, "uniform"),
        ece_equal_mass=expected_calibration_error(confidence, outcome, w, n_bins, "quantile"),
        n_labeled=int(known.sum()),
        multiclass_brier=multiclass_brier(matrix[known], truth[known], w[known]) if labeled else None,
        log_loss=log_loss(matrix[known], truth[known], w[known]) if labeled else None,
    )


def summaries_by_group(
    groups: ArrayLike,
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    correct: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, CalibrationSummary]:
    """``calibration_summary`` per distinct group label (variant, cohort, ...), keys sorted.

    Groups whose rows all have weight 0 are left out (no metric is defined for them).
    """
    matrix = as_probability_matrix(probs)
    n = matrix.shape[0]
    group_array = np.asarray(groups)
    if group_array.ndim != 1 or group_array.shape[0] != n:
        raise InvalidArgument("groups", f"must be a 1-D array of length {n}, got shape {group_array.shape}")
    truth, outcome = resolve_outcomes(matrix, labels, correct)
    w = as_weights(weights, n) if n else np.zeros(0)
    names, inverse = np.unique(group_array.astype(str), return_inverse=True)
    summaries: dict[str, CalibrationSummary] = {}
    for index, name in enumerate(names):
        rows = inverse == index
        if w[rows].sum() <= 0:
            continue
        summaries[str(name)] = calibration_summary(matrix[rows], truth[rows], outcome[rows], w[rows], n_bins)
    return summaries


def cohort_labels(household_size: ArrayLike, cold_start: ArrayLike) -> NDArray[np.str_]:
    """Cohort names such as ``"size=3/warm"`` or ``"size=1/cold"`` from per-row attributes.

    Sizes of 5 and more share one cohort (``"size=5+"``) so no cohort is starved of samples.
    """
    sizes = np.asarray(household_size)
    cold = np.asarray(cold_start)
    if sizes.ndim != 1:
        raise InvalidArgument("household_size", "must be a 1-D array")
    if cold.shape != sizes.shape:
        raise InvalidArgument("cold_start", f"must have the shape of household_size {sizes.shape}")
    if sizes.size and (sizes.dtype.kind not in "iu" or sizes.min() < 1):
        raise InvalidArgument("household_size", "must be integers >= 1")
    size_part = np.where(sizes >= 5, "size=5+", np.char.add("size=", sizes.astype(str)))
    return np.char.add(size_part, np.where(cold.astype(bool), "/cold", "/warm"))


def summaries_to_dict(summaries: Mapping[str, CalibrationSummary]) -> dict[str, dict[str, Any]]:
    """JSON-friendly form of ``summaries_by_group``."""
    return {name: summary.to_dict() for name, summary in summaries.items()}
