"""Settings of the feedback service: the shared ``ServiceSettings`` plus its own
``HEARTH_FEEDBACK_*`` variables, validated at start (a bad value names the variable).

| variable | default | meaning |
|---|---|---|
| `HEARTH_FEEDBACK_MAX_BRIER` | 0.15 | cohort trigger: top-label Brier above this |
| `HEARTH_FEEDBACK_MAX_ECE` | 0.05 | cohort trigger: ECE (15 equal-width bins) above this |
| `HEARTH_FEEDBACK_MIN_COHORT_SAMPLES` | 200 | smaller cohorts never fire |
| `HEARTH_FEEDBACK_DISAGREEMENT_COUNT` / `_WINDOW` | 3 / 5 | household trigger: k wrong of the last n |
| `HEARTH_FEEDBACK_TRIGGER_COOLDOWN_S` | 3600 | the same cohort trigger fires at most once per cooldown |
| `HEARTH_FEEDBACK_CHECK_INTERVAL_S` | 300 | periodic check (cohort triggers, pending refits, recalibration); 0 = off |
| `HEARTH_FEEDBACK_RECALIBRATE_MIN_NEW` | 500 | the periodic check refits a variant's calibrator after this many new feedback rows |
| `HEARTH_FEEDBACK_LABEL_WINDOW` | 20000 | calibration (fits, GetCalibration, cohort triggers, GetExperiment) reads the newest this many labels (prompted feedback signals); 0 = every label held. Bounds each check's memory; labels are stored until the retention purge or an erasure |
| `HEARTH_FEEDBACK_EXPERIMENT` | `model-variant` | experiment name (the hash salt of variant assignment) |
| `HEARTH_FEEDBACK_CONTROL_VARIANT` | `gmm` | control variant: the production model (the kill switch sends everyone here) |
| `HEARTH_FEEDBACK_VARIANTS` | `kmeans,gmm` | variants SetFlag accepts |
| `HEARTH_FEEDBACK_REFIT_TIMEOUT_S` | 30 | deadline of one Refit call to clustering |
| `HEARTH_FEEDBACK_AUDIT_TIMEOUT_S` | 2 | deadline of the AppendAudit call of a flag change |
| `HEARTH_RETENTION_DAYS` / `_CHECK_S` | 90 / 3600 | read with privacy: while the purge is on, feedback whose `ts` is older than now minus the retention is refused (INVALID_ARGUMENT, field `ts`), and so is a prediction about a session that started before it (`predictions[i].session_start`; `.ts` without a session) |
"""

from __future__ import annotations

from typing import Annotated

from pydantic import model_validator

from services.common.config import AtLeastOne, Positive, RetentionSettings, ServiceSettings, bounded
from services.feedback.domain.triggers import TriggerThresholds


class FeedbackSettings(RetentionSettings):
    # RetentionSettings: HEARTH_RETENTION_DAYS / _CHECK_S, read with privacy (RecordFeedback
    # refuses feedback the retention purge would erase, docs/privacy.md §7).
    service_name: str = "feedback"
    feedback_max_brier: float = 0.15
    feedback_max_ece: float = 0.05
    feedback_min_cohort_samples: int = 200
    feedback_disagreement_count: int = 3
    feedback_disagreement_window: int = 5
    feedback_trigger_cooldown_s: Annotated[float, bounded(ge=0)] = 3600.0
    feedback_check_interval_s: Annotated[float, bounded(ge=0)] = 300.0
    feedback_recalibrate_min_new: AtLeastOne = 500
    feedback_label_window: Annotated[int, bounded(ge=0)] = 20_000
    feedback_experiment: str = "model-variant"
    feedback_control_variant: str = "gmm"
    feedback_variants: str = "kmeans,gmm"
    feedback_refit_timeout_s: Positive = 30.0
    feedback_audit_timeout_s: Positive = 2.0

    @model_validator(mode="after")
    def _consistent(self) -> "FeedbackSettings":
        self.thresholds()  # raises ValueError naming the field on bad thresholds
        variants = self.variant_names()
        if self.feedback_control_variant not in variants:
            raise ValueError(f"HEARTH_FEEDBACK_CONTROL_VARIANT {self.feedback_control_variant!r} "
                             f"must be one of HEARTH_FEEDBACK_VARIANTS {variants}")
        return self

    def variant_names(self) -> tuple[str, ...]:
        return tuple(v.strip() for v in self.feedback_variants.split(",") if v.strip())

    def thresholds(self) -> TriggerThresholds:
        return TriggerThresholds(
            max_brier=self.feedback_max_brier, max_ece=self.feedback_max_ece,
            min_cohort_samples=self.feedback_min_cohort_samples,
            disagreement_count=self.feedback_disagreement_count,
            disagreement_window=self.feedback_disagreement_window)


def feedback_settings(settings: ServiceSettings) -> FeedbackSettings:
    """The feedback settings for ``settings`` (tests build plain ServiceSettings): its
    values, plus the HEARTH_FEEDBACK_* variables from the environment."""
    from services.common import config

    return config.specialise(settings, FeedbackSettings)
