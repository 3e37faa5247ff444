"""Retraining triggers: cohort calibration, household disagreement, drift."""

from __future__ import annotations

import numpy as np
import pytest

from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.evaluation import synthetic_stream
from services.feedback.domain.metrics import correctness
from services.feedback.domain.triggers import (
    DriftEvent,
    Trigger,
    TriggerThresholds,
    cohort_triggers,
    disagreement_triggers,
    drift_triggers,
    evaluate_triggers,
)


def test_defaults_are_the_documented_thresholds() -> None:
    t = TriggerThresholds()
    assert (t.max_brier, t.max_ece, t.disagreement_count, t.disagreement_window) == (0.15, 0.05, 3, 5)


def test_miscalibrated_cohort_fires_and_calibrated_one_does_not() -> None:
    # Concentration 0.3: a calibrated model is ~79 % right with top-label Brier ~0.125 (< 0.15).
    bad = synthetic_stream(3000, seed=1, variant_distortion={"kmeans": 0.4}, cold_start_rate=0.0)
    good = synthetic_stream(3000, seed=2, variant_distortion={"kmeans": 1.0}, cold_start_rate=0.0)
    probs = np.vstack([bad.probs, good.probs])
    labels = np.concatenate([bad.labels, good.labels])
    cohorts = np.array(["cold"] * 3000 + ["warm"] * 3000)
    triggers = cohort_triggers(cohorts, probs.max(1), correctness(probs, labels))
    fired = {(t.kind, t.key) for t in triggers}
    assert ("ece", "cold") in fired
    assert not any(key == "warm" for _, key in fired)
    ece = next(t for t in triggers if t.kind == "ece")
    assert ece.value > ece.threshold == 0.05 and ece.scope == "cohort" and ece.n == 3000


def test_brier_threshold_by_hand() -> None:
    # Every prediction says 0.9 and is wrong: Brier 0.81 > 0.15, ECE 0.9 > 0.05.
    triggers = cohort_triggers(["c"] * 10, [0.9] * 10, [0] * 10, thresholds=TriggerThresholds(min_cohort_samples=10))
    assert [(t.kind, t.value) for t in triggers] == [("brier", pytest.approx(0.81)), ("ece", pytest.approx(0.9))]
    # Below the minimum sample size nothing fires.
    assert cohort_triggers(["c"] * 9, [0.9] * 9, [0] * 9, thresholds=TriggerThresholds(min_cohort_samples=10)) == []
    # A stricter threshold set fires on milder miscalibration: conf 0.6, 50 % right -> ECE 0.1, Brier 0.26.
    mild = cohort_triggers(["c"] * 10, [0.6] * 10, [1, 0] * 5, thresholds=TriggerThresholds(min_cohort_samples=10, max_brier=0.3))
    assert [t.kind for t in mild] == ["ece"]


def test_disagreement_k_of_last_n() -> None:
    households = ["h1"] * 6 + ["h2"] * 5 + ["h3"] * 2
    # h1: oldest three wrong, newest three right -> last 5 hold 2 wrong: no trigger.
    # h2: wrong, right, wrong, right, wrong -> 3 of 5: trigger.
    # h3: only two items, both wrong: 2 < 3, no trigger.
    correct = [0, 0, 0, 1, 1, 1] + [0, 1, 0, 1, 0] + [0, 0]
    ts = list(range(6)) + list(range(5)) + [0, 1]
    triggers = disagreement_triggers(households, correct, ts)
    assert triggers == [Trigger("disagreement", "household", "h2", 3.0, 3.0, 5)]


def test_disagreement_uses_newest_items_regardless_of_input_order() -> None:
    rng = np.random.default_rng(0)
    ts = np.arange(8, dtype=float)
    correct = np.array([1, 1, 1, 1, 0, 0, 0, 1], dtype=float)  # newest five hold three wrong
    order = rng.permutation(8)
    (trigger,) = disagreement_triggers(np.array(["h"] * 8)[order], correct[order], ts[order])
    assert trigger.value == 3.0


def test_weak_signals_do_not_count_towards_disagreement() -> None:
    weights = [0.2, 0.2, 0.2, 1.0, 1.0]
    assert disagreement_triggers(["h"] * 5, [0, 0, 0, 0, 0], range(5), weights) == []
    assert len(disagreement_triggers(["h"] * 5, [0] * 5, range(5), [1.0] * 5)) == 1


def test_drift_events() -> None:
    events = [DriftEvent("h1", 0.9, 0.5, "new_member"), DriftEvent("h2", 0.1, 0.5)]
    assert drift_triggers(events) == [Trigger("drift", "household", "h1", 0.9, 0.5, 1)]
    with pytest.raises(InvalidArgument):
        drift_triggers([DriftEvent("h", float("nan"), 0.5)])


def test_evaluate_triggers_combines_all_sources() -> None:
    thresholds = TriggerThresholds(min_cohort_samples=5)
    triggers = evaluate_triggers(
        cohorts=["c"] * 5, household_ids=["h"] * 5, confidence=[0.95] * 5, correct=[0] * 5, ts=range(5),
        drift_events=[DriftEvent("h9", 1.0, 0.5)], thresholds=thresholds,
    )
    assert [t.kind for t in triggers] == ["brier", "ece", "disagreement", "drift"]
    assert evaluate_triggers([], [], [], [], []) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_brier": 1.5}, "max_brier"),
        ({"max_ece": -0.1}, "max_ece"),
        ({"min_cohort_samples": 0}, "min_cohort_samples"),
        ({"disagreement_count": 6}, "disagreement_count"),
        ({"disagreement_window": 2.5}, "disagreement_window"),
    ],
)
def test_invalid_thresholds_name_the_field(kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument) as info:
        TriggerThresholds(**kwargs)
    assert info.value.field == field
