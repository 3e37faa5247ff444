"""The feedback service's use cases, in four rooms wired here (constructor injection):

- ``intake`` (intake.py): RecordPrediction, RecordFeedback, and the erasure contract;
- ``triggers`` (triggers.py): household and cohort triggers, Refit and label calls to
  clustering on a background thread;
- ``calibration`` (calibration.py): the dataset, calibrators (GetCalibrator, refits,
  roll back and hold: calibrator_choice.py), GetCalibration and the gauges;
- ``experiments`` (experiments.py): GetExperiment and SetFlag (audited).

``FeedbackApp`` only composes them and runs the periodic check (every
``check_interval_s``): retry unanswered Refit requests, evaluate the cohort triggers,
recalibrate when enough new feedback arrived, refresh the gauges.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from services.common.consent import ConsentChecker
from services.common.failure_log import FailureLog
from services.feedback.calibration import Calibration
from services.feedback.calibrator_choice import CalibratorChoices
from services.feedback.experiments import MAX_REASON_CHARS, Experiments
from services.feedback.intake import Intake
from services.feedback.peers import FlagAuditor, RefitRequester, audit_flag_change
from services.feedback.policy import FeedbackPolicy
from services.feedback.store import FeedbackStore
from services.feedback.triggers import Triggers

__all__ = ["FeedbackApp", "FeedbackPolicy"]
log = logging.getLogger("hearth.feedback")


class FeedbackApp:
    def __init__(self, store: FeedbackStore, policy: FeedbackPolicy = FeedbackPolicy(), *,
                 refits: RefitRequester | None = None, auditor: FlagAuditor | None = None,
                 clock: Callable[[], float] = time.time, consent: ConsentChecker | None = None,
                 retention_s: float | None = None) -> None:
        self.store = store
        # A calibrator choice is audited like a flag change (the same hook).
        choices = CalibratorChoices(store, policy.variants, functools.partial(audit_flag_change, auditor),
                                    lambda: clock(), MAX_REASON_CHARS)
        self.calibration = Calibration(store, policy, choices, clock=clock)
        self.triggers = Triggers(store, policy, self.calibration, refits=refits, clock=clock)
        self.intake = Intake(store, policy, self.triggers, clock=clock, consent=consent, retention_s=retention_s)
        self.experiments = Experiments(store, policy, self.calibration, auditor=auditor, clock=clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One traceback per run of identical failures of a step (a database outage).
        self.periodic_failures = FailureLog(log, "periodic step")

    def periodic_check(self) -> None:
        """What the background thread runs: pending refits, cohort triggers, scheduled
        recalibration, gauges. Each step is isolated so one failure skips only itself."""
        for step in (self.triggers.retry_pending_refits, self.triggers.check_triggers,
                     self.calibration.recalibrate_if_due, self.calibration.refresh_gauges):
            try:
                step()
            except Exception:  # noqa: BLE001 - logged; the next period tries again
                self.periodic_failures.failed(key=step.__name__)
            else:
                self.periodic_failures.succeeded(key=step.__name__)

    def start_periodic(self, interval_s: float) -> None:
        if interval_s <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.periodic_check()

        self._thread = threading.Thread(target=loop, name="feedback-periodic", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.triggers.close()
