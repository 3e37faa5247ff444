"""Retraining triggers: when feedback says a model (or one household's model) has gone bad.

Three sources, each producing ``Trigger(kind, scope, key, value, threshold, n)``:

- **Cohort calibration** (``kind="brier"`` or ``"ece"``, ``scope="cohort"``): on each
  cohort (household size, cold start, variant, ...) with at least
  ``min_cohort_samples`` predictions with feedback, fire when the top-label Brier is
  above ``max_brier`` (0.15) or the equal-width ECE is above ``max_ece`` (0.05).
  Top-label Brier (not multiclass) because most feedback only says right/wrong.
  Below the minimum sample size a cohort never fires: ECE of a few dozen rows is
  mostly binning noise.
- **Household disagreement** (``kind="disagreement"``, ``scope="household"``): of the
  last ``disagreement_window`` (n = 5) feedback items of a household whose weight is at
  least ``min_signal_weight`` (0.5: explicit and hint signals, not lone implicit ones),
  at least ``disagreement_count`` (k = 3) said the predicted person was wrong.
- **Drift** (``kind="drift"``, ``scope="household"``): every drift event reported by the
  clustering service whose score reaches its threshold becomes a trigger.

Thresholds live in ``TriggerThresholds`` (validated dataclass, defaults above).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.metrics import DEFAULT_BINS, as_vector, as_weights, binary_brier, expected_calibration_error

TRIGGER_KINDS: tuple[str, ...] = ("brier", "ece", "disagreement", "drift")


@dataclass(frozen=True)
class TriggerThresholds:
    """Configurable thresholds; every field is validated on construction."""

    max_brier: float = 0.15
    max_ece: float = 0.05
    min_cohort_samples: int = 200
    disagreement_count: int = 3
    disagreement_window: int = 5
    min_signal_weight: float = 0.5
    ece_bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        for name in ("max_brier", "max_ece", "min_signal_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidArgument(name, f"must be a number in [0, 1], got {value!r}")
        for name in ("min_cohort_samples", "disagreement_count", "disagreement_window", "ece_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(name, f"must be an integer >= 1, got {value!r}")
        if self.disagreement_count > self.disagreement_window:
            raise InvalidArgument("disagreement_count", "cannot exceed disagreement_window")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Trigger:
    """A reason to retrain: ``kind`` in TRIGGER_KINDS, ``scope`` "cohort" or "household",
    ``key`` the cohort name or household id, the observed ``value`` and the ``threshold`` it
    crossed, and ``n`` the number of feedback items (or 1 for drift) behind it."""

    kind: str
    scope: str
    key: str
    value: float
    threshold: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DriftEvent:
    """A drift detection reported by clustering for one household."""

    household_id: str
    score: float
    threshold: float
    drift_type: str = "unspecified"


def cohort_triggers(
    cohorts: ArrayLike,
    confidence: ArrayLike,
    correct: ArrayLike,
    weights: ArrayLike | None = None,
    thresholds: TriggerThresholds = TriggerThresholds(),
) -> list[Trigger]:
    """Brier/ECE triggers per cohort (cohorts sorted by name; Brier before ECE)."""
    names = np.asarray(cohorts).astype(str)
    if names.ndim != 1:
        raise InvalidArgument("cohorts", "must be a 1-D array")
    n = names.shape[0]
    if n == 0:
        return []
    conf = as_vector(confidence, n, "confidence", 0.0, 1.0)
    outcome = as_vector(correct, n, "correct", 0.0, 1.0)
    w = as_weights(weights, n)
    triggers: list[Trigger] = []
    for cohort in sorted(set(names.tolist())):
        rows = names == cohort
        size = int(rows.sum())
        if size < thresholds.min_cohort_samples or w[rows].sum() <= 0:
            continue
        brier = binary_brier(conf[rows], outcome[rows], w[rows])
        if brier > thresholds.max_brier:
            triggers.append(Trigger("brier", "cohort", cohort, brier, thresholds.max_brier, size))
        ece = expected_calibration_error(conf[rows], outcome[rows], w[rows], thresholds.ece_bins)
        if ece > thresholds.max_ece:
            triggers.append(Trigger("ece", "cohort", cohort, ece, thresholds.max_ece, size))
    return triggers


def disagreement_triggers(
    household_ids: ArrayLike,
    correct: ArrayLike,
    ts: ArrayLike,
    weights: ArrayLike | None = None,
    thresholds: TriggerThresholds = TriggerThresholds(),
) -> list[Trigger]:
    """Households where >= k of the last n qualifying feedback items disagreed with the prediction.

    ``value`` is the number of disagreements in the window, ``threshold`` is k. Of equal
    timestamps the later record counts as newer. Households are returned sorted by id.
    """
    ids = np.asarray(household_ids).astype(str)
    if ids.ndim != 1:
        raise InvalidArgument("household_ids", "must be a 1-D array")
    n = ids.shape[0]
    if n == 0:
        return []
    outcome = as_vector(correct, n, "correct", 0.0, 1.0)
    times = as_vector(ts, n, "ts")
    w = as_weights(weights, n)
    keep = w >= thresholds.min_signal_weight
    ids, outcome, times = ids[keep], outcome[keep], times[keep]
    if ids.size == 0:
        return []
    # Sort by household, then newest first; equal timestamps: later input first.
    order = np.lexsort((-np.arange(ids.size), -times, ids))
    ids, disagree = ids[order], outcome[order] < 0.5
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    group = np.cumsum(np.r_[True, ids[1:] != ids[:-1]]) - 1
    rank = np.arange(ids.size) - starts[group]  # 0 = newest item of its household
    in_window = rank < thresholds.disagreement_window
    counts = np.bincount(group, weights=(disagree & in_window).astype(np.float64), minlength=starts.size)
    window_sizes = np.minimum(np.bincount(group, minlength=starts.size), thresholds.disagreement_window)
    return [
        Trigger("disagreement", "household", str(ids[starts[g]]), float(counts[g]), float(thresholds.disagreement_count), int(window_sizes[g]))
        for g in np.flatnonzero(counts >= thresholds.disagreement_count)
    ]


def drift_triggers(events: Iterable[DriftEvent]) -> list[Trigger]:
    """One trigger per drift event whose score reaches its threshold."""
    triggers: list[Trigger] = []
    for event in events:
        if not isinstance(event, DriftEvent):
            raise InvalidArgument("events", f"expected DriftEvent, got {type(event).__name__}")
        if not np.isfinite(event.score) or not np.isfinite(event.threshold):
            raise InvalidArgument("score", f"drift event for {event.household_id!r} has a non-finite score or threshold")
        if event.score >= event.threshold:
            triggers.append(Trigger("drift", "household", event.household_id, float(event.score), float(event.threshold), 1))
    return triggers


def evaluate_triggers(
    cohorts: ArrayLike,
    household_ids: ArrayLike,
    confidence: ArrayLike,
    correct: ArrayLike,
    ts: ArrayLike,
    weights: ArrayLike | None = None,
    drift_events: Sequence[DriftEvent] = (),
    thresholds: TriggerThresholds = TriggerThresholds(),
) -> list[Trigger]:
    """All triggers for one batch of feedback: cohort ones, then disagreement, then drift."""
    return (
        cohort_triggers(cohorts, confidence, correct, weights, thresholds)
        + disagreement_triggers(household_ids, correct, ts, weights, thresholds)
        + drift_triggers(drift_events)
    )
