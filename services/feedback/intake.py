"""Intake room of the feedback service: predictions from clustering
(RecordPrediction), feedback signals from clients (RecordFeedback, which hands labels
and the household's disagreement check to the triggers room), and the household's data
under the erasure contract (Erase, ExportAccount)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

from services.common.consent import ConsentChecker
from services.common.erasure import ErasureOutcome, ErasureScope
from services.common.errors import InvalidArgument
from services.common.ids import MIN_TS, check_id, check_ts
from services.common.predictions import retention_instant
from services.common.telemetry import pseudonym
from services.feedback import instruments
from services.feedback.domain.signals import SignalKind
from services.feedback.policy import FeedbackPolicy
from services.feedback.store import FeedbackItem, FeedbackStore, PredictionRecord
from services.feedback.triggers import Triggers

log = logging.getLogger("hearth.feedback")

MAX_PREDICTIONS_PER_BATCH = 10_000
UNSPECIFIED_VARIANT = "unspecified"


# How far after a prediction's ts the session it is about may reach. Clustering's events
# lie at most MAX_FUTURE_SKEW_S ahead of the clock of the replica that took them, and the
# prediction's ts is another replica's clock: a day leaves any clock skew between replicas
# to spare, since a forward refused for it would be retried for ever (prediction_log).
MAX_SESSION_AFTER_PREDICTION_S = 86_400.0


def _check_session_instants(p: PredictionRecord, path: str) -> None:
    """The session a prediction is about lies from 2000-01-01 to a day after the prediction
    and does not end before it starts. The retention purge and window erasures take
    predictions by these instants (``retention_instant``): until attack34 a session a year
    ahead kept its prediction a year past the retention, and one ending before its start
    overlapped no window."""
    latest = p.ts + MAX_SESSION_AFTER_PREDICTION_S
    for name in ("session_start", "session_end"):
        value = getattr(p, name)
        if value is not None and not (math.isfinite(value) and MIN_TS <= value <= latest):
            raise InvalidArgument("must lie between 2000-01-01 and a day after the prediction's ts",
                                  f"{path}.{name}")
    if p.session_start is not None and p.session_end is not None and p.session_end < p.session_start:
        raise InvalidArgument("must not be before session_start", f"{path}.session_end")


def validate_predictions(items: list[PredictionRecord]) -> list[PredictionRecord]:
    """Check every prediction; a household size of 0 (proto default) becomes the number
    of persons in the vector and an empty ``model_variant`` becomes ``"unspecified"``
    (its own calibrator and experiment arm; clustering should name its variant). The predicted ``person_id`` must be a most probable person
    (ties allowed): metrics take the arg-max as the prediction (dataset.py)."""
    if len(items) > MAX_PREDICTIONS_PER_BATCH:
        raise InvalidArgument(f"at most {MAX_PREDICTIONS_PER_BATCH} per batch", "predictions")
    out = []
    for i, p in enumerate(items):
        path = f"predictions[{i}]"
        check_id(p.prediction_id, f"{path}.prediction_id")
        check_id(p.account_id, f"{path}.account_id")
        check_id(p.session_id, f"{path}.session_id")
        check_id(p.person_id, f"{path}.person_id")
        check_ts(p.ts, f"{path}.ts")
        _check_session_instants(p, path)
        if not p.probabilities or len(p.probabilities) > 16:
            raise InvalidArgument("must hold 1-16 persons", f"{path}.probabilities")
        total = 0.0
        for person, prob in p.probabilities.items():
            check_id(person, f"{path}.probabilities")
            if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
                raise InvalidArgument("each probability must be in [0, 1]", f"{path}.probabilities")
            total += prob
        # One person may carry less than 1 (the rest: a member the model has not seen yet).
        if total - 1.0 > 1e-3 or (len(p.probabilities) > 1 and 1.0 - total > 1e-3):
            raise InvalidArgument("probabilities must sum to 1 (at most 1 for one person)",
                                  f"{path}.probabilities")
        if p.person_id not in p.probabilities:
            raise InvalidArgument("must be one of the persons in probabilities", f"{path}.person_id")
        if p.probabilities[p.person_id] < max(p.probabilities.values()):
            raise InvalidArgument("must be a most probable person of probabilities", f"{path}.person_id")
        if p.model_variant:
            check_id(p.model_variant, f"{path}.model_variant")
        else:
            p = replace(p, model_variant=UNSPECIFIED_VARIANT)
        if p.device_id:
            check_id(p.device_id, f"{path}.device_id")
        if p.model_version < 0:
            raise InvalidArgument("must be >= 0", f"{path}.model_version")
        if p.model_sessions < 0:
            raise InvalidArgument("must be >= 0 (0 = unknown)", f"{path}.model_sessions")
        if p.calibration_group:   # "" = the default group
            check_id(p.calibration_group, f"{path}.calibration_group")
        if p.household_size < 0 or p.household_size > 64:
            raise InvalidArgument("must be in 0..64 (0 = the number of persons)", f"{path}.household_size")
        out.append(p if p.household_size else replace(p, household_size=len(p.probabilities)))
    return out


class Intake:
    def __init__(self, store: FeedbackStore, policy: FeedbackPolicy, triggers: Triggers, *,
                 clock: Callable[[], float] = time.time, consent: ConsentChecker | None = None,
                 retention_s: float | None = None) -> None:
        self.store = store
        self.policy = policy
        self.triggers = triggers
        self.clock = clock
        # Consent (privacy service): feedback names who watched and moves the household's
        # model (labels forwarded to clustering), so it needs `processing` like ingest and
        # assignment; None = not enforced (unit tests).
        self.consent = consent
        # Feedback given longer ago than now - retention_s is refused (and, since session 32,
        # a prediction about a session that started before it): privacy's retention
        # purge erases feedback by its time at its next check, so it would vanish with no
        # sign to the client (session 21's events, session 23's touchpoints; docs/privacy.md
        # §7). None: the purge off, nothing refused for its age.
        self.retention_s = retention_s

    def record_predictions(self, items: list[PredictionRecord]) -> tuple[int, int]:
        items = validate_predictions(items)
        if self.retention_s is not None:
            # A prediction the retention purge would erase at its next check (about a session
            # older than the window) is refused, as feedback is: stored, it would be used for
            # calibration until then. Clustering's forwarder does not send such predictions
            # (prediction_log.PredictionLog), so this refuses only another caller's.
            oldest = self.clock() - self.retention_s
            for i, p in enumerate(items):
                instant, field = retention_instant(p.ts, p.session_start, p.session_end)
                if instant < oldest:
                    raise InvalidArgument("is older than the retention window (HEARTH_RETENTION_DAYS): the "
                                          "retention purge would erase the prediction", f"predictions[{i}].{field}")
        return self.store.record_predictions(items)

    def record_feedback(self, feedback_id: str, prediction_id: str, kind: SignalKind,
                        true_person_id: str | None, ts: float | None, unprompted: bool = False) -> tuple[bool, float]:
        """Store one signal; returns (duplicate, weight). Then checks the household's
        disagreement trigger (a failure there is logged, never fails the call).
        ``unprompted``: volunteered, not asked for — a label and a disagreement like any
        other, but never in calibration (Calibration.dataset)."""
        check_id(feedback_id, "feedback_id")
        check_id(prediction_id, "prediction_id")
        kind = SignalKind(kind)
        if kind == SignalKind.PROFILE_HINT:
            raise InvalidArgument("profile hints arrive with events, not as feedback", "kind")
        now = self.clock()
        ts = now if ts is None else check_ts(ts, "ts")
        if self.retention_s is not None and ts < now - self.retention_s:
            raise InvalidArgument("is older than the retention window (HEARTH_RETENTION_DAYS): the retention "
                                  "purge would erase it", "ts")
        needs_person = kind in (SignalKind.PROFILE_CORRECTED, SignalKind.PROFILE_SWITCHED)
        if needs_person:
            if not true_person_id:   # else the id rule's words, as if one had been given
                raise InvalidArgument("is required for a correction or a profile switch (explicit_correct, "
                                      "implicit_switch_profile): the person who was watching", "true_person_id")
            check_id(true_person_id, "true_person_id")
        elif true_person_id and kind != SignalKind.PROFILE_CONFIRMED:
            raise InvalidArgument(f"must be empty for {kind.value}", "true_person_id")
        weight = self.policy.weights.of(kind)
        prediction = self.store.prediction(prediction_id)
        if prediction is not None:
            if self.consent is not None:
                self.consent.require([prediction.account_id])
            if kind == SignalKind.PROFILE_CONFIRMED and true_person_id and true_person_id != prediction.person_id:
                raise InvalidArgument("a confirmation names the predicted person; use EXPLICIT_CORRECT",
                                      "true_person_id")
            if kind == SignalKind.PROFILE_CORRECTED and true_person_id == prediction.person_id:
                raise InvalidArgument("names the predicted person; use EXPLICIT_CONFIRM", "true_person_id")
        stored_person = true_person_id if needs_person else None
        prediction, duplicate = self.store.record_feedback(
            FeedbackItem(feedback_id, prediction_id, kind.value, stored_person, weight, ts, unprompted),
            received_at=now)
        if not duplicate:
            instruments.FEEDBACK_TOTAL.labels(kind.value).inc()
            self.triggers.forward_label(prediction, kind, stored_person, unprompted)
            try:
                self.triggers.check_household(prediction.account_id)
            except Exception:  # noqa: BLE001 - the feedback is stored; the next one re-checks
                log.exception("household trigger check failed for %s", pseudonym(prediction.account_id))
        return duplicate, weight

    # ------------------------------------------------------------------ erasure contract (DataHolder)

    def export_account(self, account_id: str) -> dict:
        """Everything held for one account, for privacy's household export (docs/privacy.md)."""
        return self.store.export_sections(account_id)   # lazy: streamed a page at a time

    def rekey(self, account_id: str, dek_version: int, defer_purge: bool = False) -> tuple[int, list[dict]]:
        """DataHolder.Rekey: nothing to do, the feedback service seals nothing under a
        household's data key (its predictions and labels hold ids, times and persons)."""
        return 0, []

    def erase(self, scope: ErasureScope, job_id: str = "") -> ErasureOutcome:
        """What each scope kind deletes here: FeedbackStore.erase."""
        return self.store.erase(scope)
