"""What the feedback service decides with (one object, built from settings by
``__main__.policy_from`` and handed to every room)."""

from __future__ import annotations

from dataclasses import dataclass

from services.feedback.domain.signals import SignalWeights
from services.feedback.domain.triggers import TriggerThresholds


@dataclass(frozen=True)
class FeedbackPolicy:
    """What the feedback service decides with: trigger thresholds, cooldown, when to
    recalibrate, and the experiment (name = hash salt, control, accepted variants)."""

    thresholds: TriggerThresholds = TriggerThresholds()
    trigger_cooldown_s: float = 3600.0
    recalibrate_min_new: int = 500
    experiment: str = "model-variant"
    control: str = "kmeans"
    variants: tuple[str, ...] = ("kmeans", "gmm")
    weights: SignalWeights = SignalWeights()
    # The newest labels (prompted feedback signals) calibration reads: fits, the report, the
    # cohort triggers and the experiment's comparison (0: all held). It bounds the memory of
    # each check (every label held was read at each one: docs/benchmarks.md "Feedback's
    # memory and the labels it reads"); below it nothing changes.
    label_window: int = 20_000
