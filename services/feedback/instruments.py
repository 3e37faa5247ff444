"""Prometheus metrics of the feedback service (dashboards and alerts).

Counters count events in this process since start (Prometheus sums replicas); gauges
are recomputed from the store (so every replica reports the same value) by the
periodic check, GetCalibration and GetExperiment.

- ``hearth_feedback_total{kind}``: feedback signals stored (duplicates not counted);
  kind = ``profile_confirmed`` ... (docs/feedback.md).
- ``hearth_feedback_rate``: predictions with feedback / predictions.
- ``hearth_calibration_brier{group}`` / ``hearth_calibration_ece{group}``: top-label
  Brier and ECE (equal width, 15 bins) on the predictions with feedback; group
  ``all``, ``variant=<v>``, ``cohort=<size=k/warm|cold>``, and the same with a
  ``calibrated:`` prefix after the current calibrator of each variant.
- ``hearth_variant_accuracy{variant}``: weighted accuracy per model variant.
- ``hearth_retrain_triggers_total{kind}``: triggers fired (brier, ece, disagreement, drift).
- ``hearth_calibrator_refits_held_total{variant}``: recalibrations that were due but not
  fitted because an operator holds the variant (after ``hearth calibrator rollback``,
  until ``release``): tells an operator the hold is what keeps the calibrator old.
- ``hearth_feedback_labels_read``: labels (prompted signals) the last dataset build read;
  equal to ``HEARTH_FEEDBACK_LABEL_WINDOW`` once the window binds (older labels are then
  stored but no longer read by calibration).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

FEEDBACK_TOTAL = Counter("hearth_feedback_total", "Feedback signals stored", ["kind"])
FEEDBACK_RATE = Gauge("hearth_feedback_rate", "Predictions with feedback / predictions")
# Unknown (NaN) until the first periodic check finds a prediction: with no prediction
# the rate is 0/0, not 0. Until session 20 it read 0, so every deployment without
# predictions yet (a new environment, a staging namespace nobody drives) fired
# HearthFeedbackRateLow after 6 h; no alert threshold compares true against NaN.
FEEDBACK_RATE.set(float("nan"))
CALIBRATION_BRIER = Gauge("hearth_calibration_brier", "Top-label Brier on predictions with feedback", ["group"])
CALIBRATION_ECE = Gauge("hearth_calibration_ece", "ECE (equal width) on predictions with feedback", ["group"])
VARIANT_ACCURACY = Gauge("hearth_variant_accuracy", "Weighted accuracy per model variant", ["variant"])
RETRAIN_TRIGGERS = Counter("hearth_retrain_triggers_total", "Retraining triggers fired", ["kind"])
# Every kind exists at 0 from the start, so the first trigger is an increase the alert's
# increase() sees (a series born at 1 would look like no change).
for _kind in ("brier", "ece", "disagreement", "drift"):
    RETRAIN_TRIGGERS.labels(_kind)
LABELS_READ = Gauge("hearth_feedback_labels_read",
                    "Labels (prompted signals) the last calibration dataset read: at most the label window")
CALIBRATOR_REFITS_HELD = Counter("hearth_calibrator_refits_held_total",
                                 "Due recalibrations not fitted because the variant is held", ["variant"])
