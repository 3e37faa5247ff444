"""Triggers room of the feedback service: when the model needs repair, and the calls
to clustering that ask for it.

- Household disagreement (``check_household``, after each stored feedback): k wrong
  of the household's last n fires a Refit of that household.
- Cohort triggers (``check_triggers``, periodic): Brier / ECE of the *calibrated*
  confidences per ``all``, ``variant=<v>`` and cohort; each fires at most once per
  cooldown and makes the calibration room refit.
- Explicit feedback naming a person is forwarded to clustering as a session label
  (``forward_label``).

Calls to clustering run on one background thread, so a slow clustering service never
slows a feedback call; the trigger row is stored first (refit_requested = 1, result
NULL) and the result (a status code name) is written when the call returns, so a
request lost to a restart is retried by the next periodic check (Refit is idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from services.common.feedback_to_clustering import feedback_label_source, feedback_trigger_reason
from services.feedback import instruments
from services.feedback.calibration import Calibration
from services.feedback.dataset import build_dataset
from services.feedback.domain.metrics import cohort_labels
from services.feedback.domain.signals import SignalKind
from services.feedback.domain.triggers import Trigger, cohort_triggers, disagreement_triggers
from services.feedback.peers import RefitRequester
from services.feedback.policy import FeedbackPolicy
from services.feedback.store import FeedbackStore

log = logging.getLogger("hearth.feedback")


class Triggers:
    def __init__(self, store: FeedbackStore, policy: FeedbackPolicy, calibration: Calibration, *,
                 refits: RefitRequester | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policy = policy
        self.calibration = calibration
        self.refits = refits
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-refit")
        self._in_flight: dict[object, Future] = {}
        self._lock = threading.Lock()

    def check_household(self, account_id: str) -> list[Trigger]:
        """Disagreement trigger of one household, on feedback received since its last
        disagreement trigger (so one burst of wrong predictions fires once)."""
        since = self.store.last_trigger_ts("household", account_id, "disagreement", now=self.clock())
        data = build_dataset(self.store.feedback_joined(account_id=account_id, received_after=since),
                             self.policy.weights)
        if not len(data):
            return []
        fired = disagreement_triggers(data.account_ids, data.correct, data.ts, data.weights, self.policy.thresholds)
        for trigger in fired:
            self._record_trigger(trigger, self.clock())
        return fired

    def check_triggers(self) -> list[Trigger]:
        """Cohort triggers (Brier, ECE) per ``all``, ``variant=<v>`` and cohort, on the
        *calibrated* confidences of feedback received since each variant's current
        calibrator was fitted (out of sample for it): a trigger means the repair in force
        does not hold. Each (kind, cohort) fires at most once per cooldown; when any fires,
        the calibrators are refitted."""
        now = self.clock()
        data = self.calibration.dataset()
        calibrators = self.store.current_calibrators()
        ahead = sorted(v for v, c in calibrators.items() if c.fitted_at > now)
        if ahead:
            # Fitted while the clock was ahead (a step since put right): which feedback came
            # after the fit cannot be told by its time, and none would until the clock caught
            # up (session 24: cohort triggers silenced for the step's length). Refitted now,
            # the window out of sample for them starts now.
            log.warning("calibrators of %s were fitted at a time later than now (the clock stepped back): "
                        "refitting them", ", ".join(ahead))
            self.calibration.recalibrate(ahead)
            calibrators = self.store.current_calibrators()
        if len(data):
            # One still later than now (its variant held by an operator, not refitted): all
            # its feedback is read. Feedback received "later than now" (while the clock was
            # ahead) was in every fit since: never out of sample.
            fitted_at = np.array([calibrators[v].fitted_at if v in calibrators and calibrators[v].fitted_at <= now
                                  else -np.inf for v in data.variants])
            data = data.subset((data.received_at > fitted_at) & (data.received_at <= now))
        if not len(data):
            return []
        calibrated = self.calibration.calibrated_probs(data, calibrators)
        confidence = calibrated.max(axis=1)
        groups = np.concatenate([np.full(len(data), "all"), np.char.add("variant=", data.variants),
                                 np.char.add("cohort=", cohort_labels(data.household_size, data.cold_start))])
        fired = cohort_triggers(groups, np.tile(confidence, 3), np.tile(data.correct, 3), np.tile(data.weights, 3),
                                self.policy.thresholds)
        recorded = []
        for trigger in fired:
            last = self.store.last_trigger_ts("cohort", trigger.key, trigger.kind, now=now)
            if last is not None and now - last < self.policy.trigger_cooldown_s:
                continue
            self._record_trigger(trigger, now)
            recorded.append(trigger)
        if recorded:
            self.calibration.recalibrate()
        return recorded

    def _record_trigger(self, trigger: Trigger, now: float) -> int:
        household = trigger.scope == "household"
        refit = household and self.refits is not None
        trigger_id = self.store.insert_trigger(trigger.kind, trigger.scope, trigger.key, trigger.value,
                                               trigger.threshold, trigger.n, now, refit)
        instruments.RETRAIN_TRIGGERS.labels(trigger.kind).inc()
        log.info("retraining trigger", extra={"fields": {**trigger.to_dict(), "trigger_id": trigger_id}})
        if refit:
            reason = feedback_trigger_reason(trigger_id, f": {trigger.kind} {trigger.value:g} >= "
                                             f"{trigger.threshold:g} over {trigger.n} feedback items")
            self._submit_refit(trigger_id, trigger.key, reason)
        return trigger_id

    def retry_pending_refits(self) -> int:
        pending = self.store.pending_refits() if self.refits is not None else []
        for trigger in pending:
            self._submit_refit(trigger.trigger_id, trigger.scope_key,
                               feedback_trigger_reason(trigger.trigger_id, f" (retry): {trigger.kind}"))
        return len(pending)

    def forward_label(self, prediction, kind: SignalKind, true_person: str | None, unprompted: bool = False) -> None:
        """Explicit feedback names the person of a stored session: hand it to clustering
        as a label (its semi-supervised fit uses it), marked when the user volunteered it
        (``unprompted``: it names a person, it does not say how large their share is).
        Vector-only predictions have no stored session (their session id is the
        prediction id) and are skipped."""
        person = prediction.person_id if kind == SignalKind.PROFILE_CONFIRMED else true_person
        if (self.refits is None or person is None or not hasattr(self.refits, "record_label")
                or prediction.session_id == prediction.prediction_id):
            return
        future = self._executor.submit(self.refits.record_label, prediction.account_id,
                                       prediction.session_id, person, feedback_label_source(kind.value, unprompted))
        with self._lock:
            self._in_flight[f"label:{prediction.prediction_id}"] = future
        future.add_done_callback(lambda _f: self._drop_in_flight(f"label:{prediction.prediction_id}"))

    def _submit_refit(self, trigger_id: int, account_id: str, reason: str) -> None:
        with self._lock:
            if trigger_id in self._in_flight:
                return
            future = self._executor.submit(self._refit, trigger_id, account_id, reason)
            self._in_flight[trigger_id] = future

    def _refit(self, trigger_id: int, account_id: str, reason: str) -> str:
        try:
            result = self.refits.refit(account_id, reason) if self.refits else "NOT_CONFIGURED"
            self.store.set_refit_result(trigger_id, result, self.clock())
            return result
        finally:
            with self._lock:
                self._in_flight.pop(trigger_id, None)

    def _drop_in_flight(self, key) -> None:
        with self._lock:
            self._in_flight.pop(key, None)

    def drain_refits(self, timeout_s: float = 30.0) -> None:
        """Wait until every submitted Refit call has returned and its result is stored."""
        with self._lock:
            futures = list(self._in_flight.values())
        wait(futures, timeout=timeout_s)

    def close(self) -> None:
        # Work already running finishes; queued label forwards and refits are cancelled so
        # that a shutdown is not held hostage by a clustering service that is down (each
        # forward retries for seconds). What a cancelled forward costs: the feedback stays
        # stored here and counts for calibration, but clustering does not get that session's
        # label (RecordFeedback is idempotent; a client re-sending it forwards it again).
        self._executor.shutdown(wait=True, cancel_futures=True)
