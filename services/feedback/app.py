"""Use cases of the feedback service: thin orchestration of store, domain and peers.

Request path (servicer -> here -> store/domain):
``record_predictions``, ``record_feedback`` (then the household disagreement check),
``calibration_report``, ``experiment``, ``set_flags``, ``erase``.

Background (``periodic_check``, every ``check_interval_s``; also callable directly):
retry unanswered Refit requests, evaluate the cohort triggers, recalibrate when a
cohort trigger fired or enough new feedback arrived, refresh the gauges.

Refit requests run on one background thread, so a slow clustering service never slows
a feedback call; the trigger row is stored first (refit_requested = 1, result NULL) and
the result (a status code name) is written when the call returns, so a request lost to a
restart is retried by the next periodic check (Refit is idempotent).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.ids import check_id, check_ts
from services.common.erasure import ErasureOutcome, ErasureScope
from services.common.errors import Conflict, InvalidArgument
from services.common.identity import Principal
from services.common.telemetry import pseudonym
from services.feedback import instruments
from services.feedback.calibrator_choice import CalibratorChoices
from services.feedback.dataset import LabelledPredictions, build_dataset
from services.feedback.domain.metrics import (
    CalibrationSummary,
    cohort_labels,
    reliability_table,
    summaries_by_group,
)
from services.feedback.domain.recalibration import IDENTITY, Calibrator, FeedbackSample, fit_calibrator
from services.feedback.domain.signals import SignalKind, SignalWeights
from services.feedback.domain.triggers import Trigger, TriggerThresholds, cohort_triggers, disagreement_triggers
from services.feedback.domain.variants import ExperimentFlags, assign_variant, compare_variants
from services.feedback.peers import FlagAuditor, FlagChange, RefitRequester
from services.feedback.store import FeedbackItem, FeedbackStore, PredictionRecord

log = logging.getLogger("hearth.feedback")

MAX_PREDICTIONS_PER_BATCH = 10_000
DEFAULT_REPORT_BINS = 10  # the proto's "0 = 10"
MAX_REPORT_BINS = 100
MAX_REASON_CHARS = 500
GROUP_BY = ("", "variant", "household_size", "cold_start")
CALIBRATED_PREFIX = "calibrated:"
UNSPECIFIED_VARIANT = "unspecified"
EXPERIMENT_BOOTSTRAP_DRAWS = 200  # GetExperiment reports only the z-test; keep the bootstrap cheap
FLAG_CAS_ATTEMPTS = 5


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
        if p.household_size < 0 or p.household_size > 64:
            raise InvalidArgument("must be in 0..64 (0 = the number of persons)", f"{path}.household_size")
        out.append(p if p.household_size else replace(p, household_size=len(p.probabilities)))
    return out


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


@dataclass(frozen=True)
class GroupReport:
    """One group of a calibration report; ``bins`` are the non-empty reliability bins as
    dicts (lower, upper, count, mean_confidence, accuracy)."""

    group: str
    summary: CalibrationSummary
    bins: list[dict[str, Any]]


@dataclass(frozen=True)
class CalibrationReport:
    groups: list[GroupReport]
    calibrator_version: str


@dataclass(frozen=True)
class VariantResultView:
    variant: str
    n: int
    accuracy: float
    brier: float


@dataclass(frozen=True)
class ExperimentView:
    variant: str
    traffic: dict[str, float]
    kill_switch: bool
    results: list[VariantResultView]
    p_value: float
    version: int


@dataclass
class _Background:
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="feedback-refit"))
    in_flight: dict[int, Future] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class FeedbackApp:
    def __init__(self, store: FeedbackStore, policy: FeedbackPolicy = FeedbackPolicy(), *,
                 refits: RefitRequester | None = None, auditor: FlagAuditor | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policy = policy
        self.refits = refits
        self.auditor = auditor
        self.clock = clock
        self._bg = _Background()
        # Roll back / hold calibrators (calibrator_choice.py); audited like a flag change.
        self.calibrator_choices = CalibratorChoices(store, policy.variants, self.audit_flag_change,
                                                    lambda: self.clock(), MAX_REASON_CHARS)

    # ------------------------------------------------------------------ predictions and feedback

    def record_predictions(self, items: list[PredictionRecord]) -> tuple[int, int]:
        return self.store.record_predictions(validate_predictions(items))

    def record_feedback(self, feedback_id: str, prediction_id: str, kind: SignalKind,
                        true_person_id: str | None, ts: float | None) -> tuple[bool, float]:
        """Store one signal; returns (duplicate, weight). Then checks the household's
        disagreement trigger (a failure there is logged, never fails the call)."""
        check_id(feedback_id, "feedback_id")
        check_id(prediction_id, "prediction_id")
        kind = SignalKind(kind)
        if kind == SignalKind.PROFILE_HINT:
            raise InvalidArgument("profile hints arrive with events, not as feedback", "kind")
        now = self.clock()
        ts = now if ts is None else check_ts(ts, "ts")
        needs_person = kind in (SignalKind.PROFILE_CORRECTED, SignalKind.PROFILE_SWITCHED)
        if needs_person:
            check_id(true_person_id, "true_person_id")
        elif true_person_id and kind != SignalKind.PROFILE_CONFIRMED:
            raise InvalidArgument(f"must be empty for {kind.value}", "true_person_id")
        weight = self.policy.weights.of(kind)
        prediction = self.store.prediction(prediction_id)
        if prediction is not None:
            if kind == SignalKind.PROFILE_CONFIRMED and true_person_id and true_person_id != prediction.person_id:
                raise InvalidArgument("a confirmation names the predicted person; use EXPLICIT_CORRECT",
                                      "true_person_id")
            if kind == SignalKind.PROFILE_CORRECTED and true_person_id == prediction.person_id:
                raise InvalidArgument("names the predicted person; use EXPLICIT_CONFIRM", "true_person_id")
        stored_person = true_person_id if needs_person else None
        prediction, duplicate = self.store.record_feedback(
            FeedbackItem(feedback_id, prediction_id, kind.value, stored_person, weight, ts), received_at=now)
        if not duplicate:
            instruments.FEEDBACK_TOTAL.labels(kind.value).inc()
            self._forward_label(prediction, kind, stored_person)
            try:
                self.check_household(prediction.account_id)
            except Exception:  # noqa: BLE001 - the feedback is stored; the next one re-checks
                log.exception("household trigger check failed for %s", pseudonym(prediction.account_id))
        return duplicate, weight

    # ------------------------------------------------------------------ triggers

    def check_household(self, account_id: str) -> list[Trigger]:
        """Disagreement trigger of one household, on feedback received since its last
        disagreement trigger (so one burst of wrong predictions fires once)."""
        since = self.store.last_trigger_ts("household", account_id, "disagreement")
        data = build_dataset(self.store.feedback_joined(account_id=account_id, received_after=since),
                             self.policy.weights)
        if not len(data):
            return []
        fired = disagreement_triggers(data.account_ids, data.correct, data.ts, data.weights, self.policy.thresholds)
        for trigger in fired:
            self._record_trigger(trigger, self.clock())
        return fired

    def _record_trigger(self, trigger: Trigger, now: float) -> int:
        household = trigger.scope == "household"
        refit = household and self.refits is not None
        trigger_id = self.store.insert_trigger(trigger.kind, trigger.scope, trigger.key, trigger.value,
                                               trigger.threshold, trigger.n, now, refit)
        instruments.RETRAIN_TRIGGERS.labels(trigger.kind).inc()
        log.info("retraining trigger", extra={"fields": {**trigger.to_dict(), "trigger_id": trigger_id}})
        if refit:
            reason = (f"feedback trigger {trigger_id}: {trigger.kind} {trigger.value:g} >= "
                      f"{trigger.threshold:g} over {trigger.n} feedback items")
            self._submit_refit(trigger_id, trigger.key, reason)
        return trigger_id

    def _forward_label(self, prediction, kind: SignalKind, true_person: str | None) -> None:
        """Explicit feedback names the person of a stored session: hand it to clustering
        as a label (its semi-supervised fit uses it). Vector-only predictions have no
        stored session (their session id is the prediction id) and are skipped."""
        person = prediction.person_id if kind == SignalKind.PROFILE_CONFIRMED else true_person
        if (self.refits is None or person is None or not hasattr(self.refits, "record_label")
                or prediction.session_id == prediction.prediction_id):
            return
        future = self._bg.executor.submit(self.refits.record_label, prediction.account_id,
                                          prediction.session_id, person, f"feedback:{kind.value}")
        with self._bg.lock:
            self._bg.in_flight[f"label:{prediction.prediction_id}"] = future
        future.add_done_callback(lambda _f: self._drop_in_flight(f"label:{prediction.prediction_id}"))

    def _drop_in_flight(self, key) -> None:
        with self._bg.lock:
            self._bg.in_flight.pop(key, None)

    def _submit_refit(self, trigger_id: int, account_id: str, reason: str) -> None:
        with self._bg.lock:
            if trigger_id in self._bg.in_flight:
                return
            future = self._bg.executor.submit(self._refit, trigger_id, account_id, reason)
            self._bg.in_flight[trigger_id] = future

    def _refit(self, trigger_id: int, account_id: str, reason: str) -> str:
        try:
            result = self.refits.refit(account_id, reason) if self.refits else "NOT_CONFIGURED"
            self.store.set_refit_result(trigger_id, result, self.clock())
            return result
        finally:
            with self._bg.lock:
                self._bg.in_flight.pop(trigger_id, None)

    def drain_refits(self, timeout_s: float = 30.0) -> None:
        """Wait until every submitted Refit call has returned and its result is stored."""
        with self._bg.lock:
            futures = list(self._bg.in_flight.values())
        wait(futures, timeout=timeout_s)

    def check_triggers(self) -> list[Trigger]:
        """Cohort triggers (Brier, ECE) per ``all``, ``variant=<v>`` and cohort, on the
        *calibrated* confidences of feedback received since each variant's current
        calibrator was fitted (out of sample for it): a trigger means the repair in force
        does not hold. Each (kind, cohort) fires at most once per cooldown; when any fires,
        the calibrators are refitted."""
        now = self.clock()
        data = self.dataset()
        calibrators = self.store.current_calibrators()
        if len(data):
            fitted_at = np.array([calibrators[v].fitted_at if v in calibrators else -np.inf for v in data.variants])
            data = data.subset(data.received_at > fitted_at)
        if not len(data):
            return []
        calibrated = self._calibrated_probs(data, calibrators)
        confidence = calibrated.max(axis=1)
        groups = np.concatenate([np.full(len(data), "all"), np.char.add("variant=", data.variants),
                                 np.char.add("cohort=", cohort_labels(data.household_size, data.cold_start))])
        fired = cohort_triggers(groups, np.tile(confidence, 3), np.tile(data.correct, 3), np.tile(data.weights, 3),
                                self.policy.thresholds)
        recorded = []
        for trigger in fired:
            last = self.store.last_trigger_ts("cohort", trigger.key, trigger.kind)
            if last is not None and now - last < self.policy.trigger_cooldown_s:
                continue
            self._record_trigger(trigger, now)
            recorded.append(trigger)
        if recorded:
            self.recalibrate()
        return recorded

    def retry_pending_refits(self) -> int:
        pending = self.store.pending_refits() if self.refits is not None else []
        for trigger in pending:
            self._submit_refit(trigger.trigger_id, trigger.scope_key,
                               f"feedback trigger {trigger.trigger_id} (retry): {trigger.kind}")
        return len(pending)

    def periodic_check(self) -> None:
        """What the background thread runs: pending refits, cohort triggers, scheduled
        recalibration, gauges. Each step is isolated so one failure skips only itself."""
        for step in (self.retry_pending_refits, self.check_triggers, self.recalibrate_if_due, self.refresh_gauges):
            try:
                step()
            except Exception:  # noqa: BLE001 - logged; the next period tries again
                log.exception("periodic step %s failed", step.__name__)

    def start_periodic(self, interval_s: float) -> None:
        if interval_s <= 0 or self._bg.thread is not None:
            return

        def loop() -> None:
            while not self._bg.stop.wait(interval_s):
                self.periodic_check()

        self._bg.thread = threading.Thread(target=loop, name="feedback-periodic", daemon=True)
        self._bg.thread.start()

    def close(self) -> None:
        self._bg.stop.set()
        if self._bg.thread is not None:
            self._bg.thread.join(10)
        # Work already running finishes; queued label forwards and refits are cancelled so
        # that a shutdown is not held hostage by a clustering service that is down (each
        # forward retries for seconds). What a cancelled forward costs: the feedback stays
        # stored here and counts for calibration, but clustering does not get that session's
        # label (RecordFeedback is idempotent; a client re-sending it forwards it again).
        self._bg.executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ calibration

    def dataset(self) -> LabelledPredictions:
        return build_dataset(self.store.feedback_joined(), self.policy.weights)

    def current_calibrators(self) -> dict[str, Calibrator]:
        return {v: Calibrator.from_json(c.calibrator_json) for v, c in self.store.current_calibrators().items()}

    def apply_calibration(self, variant: str, probs: Any) -> NDArray[np.float64]:
        """Recalibrated probability vectors of ``variant`` under its current calibrator
        (identity when none was fitted yet)."""
        return self.current_calibrators().get(variant, IDENTITY).apply(probs)

    def _calibrated_probs(self, data: LabelledPredictions, stored: Mapping | None = None) -> NDArray[np.float64]:
        stored = self.store.current_calibrators() if stored is None else stored
        out = data.probs.copy()
        for variant, entry in stored.items():
            rows = data.variants == variant
            if rows.any():
                out[rows] = Calibrator.from_json(entry.calibrator_json).apply(data.probs[rows])
        return out

    def calibrator_for(self, variant: str) -> tuple[int, Calibrator]:
        """The calibrator in force for ``variant`` and its version (0 = identity)."""
        if not variant or len(variant) > 64:
            raise InvalidArgument("must be a variant name of 1-64 characters", "variant")
        stored = self.store.current_calibrators().get(variant)
        if stored is None:
            return 0, IDENTITY
        return stored.version, Calibrator.from_json(stored.calibrator_json)

    def calibrator_version(self) -> str:
        """``"<variant>:<version>,..."`` of the calibrators in force, sorted; "" before the first fit."""
        return ",".join(f"{v}:{c.version}" for v, c in sorted(self.store.current_calibrators().items()))

    def recalibrate(self, variants: Sequence[str] | None = None) -> dict[str, Calibrator]:
        """Fit one calibrator per variant on all its feedback so far (``fit_calibrator``:
        identity, temperature or isotonic by cross-validated ECE), store it as the
        variant's next version and make it current. Returns what was stored. Variants
        an operator holds (calibrator_choice.py: after a rollback) are left alone."""
        data = self.dataset()
        fitted: dict[str, Calibrator] = {}
        if not len(data):
            return fitted
        now = self.clock()
        present = sorted(set(data.variants.tolist()))
        held = self.calibrator_choices.held_variants(present)
        for variant in present:
            if (variants is not None and variant not in variants) or variant in held:
                continue
            rows = data.variants == variant
            sample = FeedbackSample.create(data.probs[rows], labels=data.labels[rows], correct=data.correct[rows],
                                           weights=data.weights[rows])
            version = self.store.next_calibrator_version(variant)
            calibrator = fit_calibrator(sample, version=version)
            calibrator = replace(calibrator, training={**calibrator.training, "fitted_at": now,
                                                       "received_through": float(data.received_at[rows].max())})
            if self.store.save_calibrator(variant, version, calibrator.to_json(), now):
                fitted[variant] = calibrator
                log.info("calibrator fitted", extra={"fields": {"variant": variant, "version": version,
                                                                "method": calibrator.method, "n": len(sample)}})
        return fitted

    def recalibrate_if_due(self) -> dict[str, Calibrator]:
        """Recalibrate the variants with at least ``recalibrate_min_new`` feedback rows
        more than their current calibrator was fitted on."""
        data = self.dataset()
        if not len(data):
            return {}
        current = self.current_calibrators()
        names, counts = np.unique(data.variants, return_counts=True)
        due = [str(v) for v, n in zip(names, counts)
               if n - int(current[v].training.get("n", 0) if v in current else 0) >= self.policy.recalibrate_min_new]
        return self.recalibrate(due) if due else {}

    def calibration_report(self, group_by: str, bins: int) -> CalibrationReport:
        """Metrics and reliability bins per group, before (group name as is) and after
        the current calibrators (``calibrated:<group>``)."""
        if group_by not in GROUP_BY:
            raise InvalidArgument(f"must be one of {list(GROUP_BY)}", "group_by")
        if isinstance(bins, bool) or not isinstance(bins, int) or not 0 <= bins <= MAX_REPORT_BINS:
            raise InvalidArgument(f"must be in 0..{MAX_REPORT_BINS} (0 = {DEFAULT_REPORT_BINS})", "bins")
        n_bins = bins or DEFAULT_REPORT_BINS
        stored = self.store.current_calibrators()
        version = ",".join(f"{v}:{c.version}" for v, c in sorted(stored.items()))
        data = self.dataset()
        if not len(data):
            return CalibrationReport([], version)
        names = _group_names(data, group_by)
        groups = (_group_reports(names, data.probs, data, n_bins, "")
                  + _group_reports(names, self._calibrated_probs(data, stored), data, n_bins, CALIBRATED_PREFIX))
        label = group_by or "all"
        for g in groups:
            prefix = CALIBRATED_PREFIX if g.group.startswith(CALIBRATED_PREFIX) else ""
            name = g.group.removeprefix(CALIBRATED_PREFIX)
            gauge_group = prefix + ("all" if not group_by else f"{label}={name}")
            instruments.CALIBRATION_BRIER.labels(gauge_group).set(g.summary.brier)
            instruments.CALIBRATION_ECE.labels(gauge_group).set(g.summary.ece)
        return CalibrationReport(groups, version)

    def refresh_gauges(self) -> None:
        predictions, with_feedback = self.store.counts()
        instruments.FEEDBACK_RATE.set(with_feedback / predictions if predictions else 0.0)
        data = self.dataset()
        if not len(data):
            return
        calibrated = self._calibrated_probs(data)
        groups = {"all": np.ones(len(data), dtype=bool)}
        for v in np.unique(data.variants):
            groups[f"variant={v}"] = data.variants == v
        cohorts = cohort_labels(data.household_size, data.cold_start)
        for c in np.unique(cohorts):
            groups[f"cohort={c}"] = cohorts == c
        for prefix, probs in (("", data.probs), (CALIBRATED_PREFIX, calibrated)):
            confidence = probs.max(axis=1)
            for name, rows in groups.items():
                w = data.weights[rows]
                brier = float(np.dot(w, (confidence[rows] - data.correct[rows]) ** 2) / w.sum())
                table = reliability_table(confidence[rows], data.correct[rows], w)
                instruments.CALIBRATION_BRIER.labels(prefix + name).set(brier)
                instruments.CALIBRATION_ECE.labels(prefix + name).set(table.ece)
        for v in np.unique(data.variants):
            rows = data.variants == v
            accuracy = float(np.dot(data.weights[rows], data.correct[rows]) / data.weights[rows].sum())
            instruments.VARIANT_ACCURACY.labels(str(v)).set(accuracy)

    # ------------------------------------------------------------------ experiment

    def default_flags(self) -> ExperimentFlags:
        """Before the first SetFlag: everyone in control (version 0)."""
        return ExperimentFlags(salt=self.policy.experiment, control=self.policy.control, traffic={},
                               kill_switch=False, version=0)

    def flags(self) -> ExperimentFlags:
        stored = self.store.current_flags(self.policy.experiment)
        return ExperimentFlags.from_json(stored.flags_json) if stored else self.default_flags()

    def experiment(self, account_id: str = "") -> ExperimentView:
        """The account's variant (when given), the configured split (control included;
        ``kill_switch`` says whether it is in force), per-variant results on feedback, and
        the p-value of the accuracy z-test of treatment vs control (with several
        treatments: the smallest, Bonferroni-adjusted; NaN when nothing to compare)."""
        flags = self.flags()
        variant = assign_variant(flags, check_id(account_id, "account_id")) if account_id else ""
        treated = sum(flags.traffic.values())
        traffic = {flags.control: round(100.0 - treated, 2), **{k: float(v) for k, v in flags.traffic.items()}}
        results: list[VariantResultView] = []
        p_value = math.nan
        data = self.dataset()
        if len(data):
            metrics, comparisons = compare_variants(data.variants, data.confidence, data.correct, data.weights,
                                                    control=flags.control, n_bootstrap=EXPERIMENT_BOOTSTRAP_DRAWS)
            results = [VariantResultView(m.variant, m.n, m.accuracy, m.brier) for m in metrics.values()]
            for m in metrics.values():
                instruments.VARIANT_ACCURACY.labels(m.variant).set(m.accuracy)
            if comparisons:
                p_value = min(1.0, min(c.p_value for c in comparisons) * len(comparisons))
        return ExperimentView(variant, traffic, flags.kill_switch, results, p_value, flags.version)

    def set_flags(self, traffic: Mapping[str, float], kill_switch: bool, reason: str,
                  principal: Principal) -> int:
        """New flags version: ``traffic`` is the full split (control included, summing to
        100, known variants only); an empty ``traffic`` keeps the current split and sets
        only the kill switch. Stored (compare-and-swap on the version), then audited."""
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"must say why, in 1-{MAX_REASON_CHARS} characters", "reason")
        for name in traffic:
            if name not in self.policy.variants:
                raise InvalidArgument(f"unknown variant {name!r}; known: {list(self.policy.variants)}",
                                      f"traffic.{name}")
        for _ in range(FLAG_CAS_ATTEMPTS):
            stored = self.store.current_flags(self.policy.experiment)
            current = ExperimentFlags.from_json(stored.flags_json) if stored else self.default_flags()
            version = current.version + 1
            if traffic:
                new = ExperimentFlags.from_split(self.policy.experiment, dict(traffic), self.policy.control,
                                                 kill_switch=kill_switch, version=version)
            else:
                new = replace(current, kill_switch=kill_switch, version=version)
            now = self.clock()
            if self.store.insert_flags(self.policy.experiment, version, new.to_json(), reason, principal.id, now):
                break
        else:
            raise Conflict("flags changed concurrently; retry", "version")
        change = FlagChange(self.policy.experiment, version, current.version, new.to_json(), current.to_json(),
                            reason, principal, now)
        result = self.audit_flag_change(change)
        self.store.set_flags_audit_result(self.policy.experiment, version, result)
        return version

    def audit_flag_change(self, change: FlagChange) -> str:
        """The audit hook of every flag change: the privacy audit log when configured
        (peers.PrivacyFlagAuditor), else only the local ``flags`` history ("LOCAL_ONLY")."""
        if self.auditor is None:
            return "LOCAL_ONLY"
        try:
            return self.auditor.audit_flag_change(change)
        except Exception:  # noqa: BLE001 - the change is stored; the audit outcome says what happened
            log.exception("audit hook failed for flags version %d", change.version)
            return "UNKNOWN"

    # ------------------------------------------------------------------ erasure

    def export_account(self, account_id: str) -> dict:
        """Everything held for one account, for privacy's household export (docs/privacy.md)."""
        return self.store.export_account(account_id)

    def erase(self, scope: ErasureScope, job_id: str = "") -> ErasureOutcome:
        if scope.kind == "device":
            log.info("device erasure widened to the household: predictions carry no device",
                     extra={"fields": {"job_id": job_id}})
        return self.store.erase(scope)


def _group_names(data: LabelledPredictions, group_by: str) -> NDArray[np.str_]:
    if group_by == "variant":
        return data.variants
    if group_by == "household_size":
        return data.household_size.astype(str)
    if group_by == "cold_start":
        return np.where(data.cold_start, "cold", "warm")
    return np.full(len(data), "all")


def _group_reports(names: NDArray[np.str_], probs: NDArray[np.float64], data: LabelledPredictions,
                   n_bins: int, prefix: str) -> list[GroupReport]:
    summaries = summaries_by_group(names, probs, data.labels, data.correct, data.weights, n_bins)
    confidence = probs.max(axis=1)
    reports = []
    for name, summary in summaries.items():
        rows = names == name
        table = reliability_table(confidence[rows], data.correct[rows], data.weights[rows], n_bins)
        bins = [r for r in table.to_records() if r["count"] > 0]
        reports.append(GroupReport(prefix + name, summary, bins))
    return reports
