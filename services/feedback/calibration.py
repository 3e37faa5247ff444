"""Calibration room of the feedback service: the labelled dataset, the calibrator in
force per model variant (GetCalibrator), refitting calibrators (recalibrate, and on a
schedule recalibrate_if_due), the calibration report (GetCalibration) and the gauges.

Every other room reads the dataset and calibrated confidences through this one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.errors import InvalidArgument
from services.feedback import instruments
from services.feedback.calibrator_choice import CalibratorChoices, choice_key
from services.feedback.dataset import LabelledPredictions, build_dataset
from services.feedback.domain.metrics import (
    CalibrationSummary,
    cohort_labels,
    reliability_table,
    summaries_by_group,
)
from services.feedback.domain.recalibration import (
    DEFAULT_SEGMENT_EDGES,
    IDENTITY,
    Calibrator,
    FeedbackSample,
    FEEDBACK_GROUP_OF,
    feedback_groups,
    fit_grouped_calibrator,
    segment_names,
    segment_of,
)
from services.feedback.policy import FeedbackPolicy
from services.feedback.store import FeedbackStore

log = logging.getLogger("hearth.feedback")

DEFAULT_REPORT_BINS = 10  # the proto's "0 = 10"
MAX_REPORT_BINS = 100
GROUP_BY = ("", "variant", "household_size", "cold_start", "model_age", "calibration_group")
CALIBRATED_PREFIX = "calibrated:"


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


class Calibration:
    def __init__(self, store: FeedbackStore, policy: FeedbackPolicy, choices: CalibratorChoices, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policy = policy
        # Roll back / hold calibrators (calibrator_choice.py: ListCalibrators, ActivateCalibrator).
        self.choices = choices
        self.clock = clock

    def dataset(self) -> LabelledPredictions:
        """The feedback calibration learns from (and reports, and experiments compare):
        what was asked for. Volunteered feedback (a "not me" button) exists because the
        answer was wrong, so a calibrator fitted on it would learn that answers are wrong
        far more often than they are, and push every confidence down. Of it, the newest
        ``policy.label_window`` signals (docs/feedback.md, "Which labels calibration reads")."""
        return self._labelled()[0]

    def _labelled(self) -> tuple[LabelledPredictions, bool]:
        """The dataset and whether the label window cut older labels off."""
        window = self.policy.label_window or None
        rows = self.store.feedback_joined(prompted_only=True, newest=window)
        instruments.LABELS_READ.set(len(rows))
        return build_dataset(rows, self.policy.weights), window is not None and len(rows) >= window

    def current_calibrators(self) -> dict[str, Calibrator]:
        return {v: Calibrator.from_json(c.calibrator_json) for v, c in self.store.current_calibrators().items()}

    def apply_calibration(self, variant: str, probs: Any, model_sessions: Any = None,
                          groups: Any = None) -> NDArray[np.float64]:
        """Recalibrated probability vectors of ``variant`` under its current calibrator
        (identity when none was fitted yet); ``model_sessions`` per row picks its model-age
        segment (None: unknown, the pooled map), ``groups`` its calibration group's
        calibrator (None: the pooled one)."""
        return self.current_calibrators().get(variant, IDENTITY).apply(probs, model_sessions, groups)

    def calibrated_probs(self, data: LabelledPredictions, stored: Mapping | None = None) -> NDArray[np.float64]:
        stored = self.store.current_calibrators() if stored is None else stored
        out = data.probs.copy()
        for variant, entry in stored.items():
            rows = data.variants == variant
            if rows.any():
                out[rows] = Calibrator.from_json(entry.calibrator_json).apply(
                    data.probs[rows], data.model_sessions[rows], data.calibration_groups[rows])
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
        """Fit one calibrator per variant on all its feedback so far (of the label window)
        (``fit_feedback_calibrator``: one shrunk shift of the confidence level, per model-age
        segment and kind of answer a further shrunk shift; a map of the shape only when it
        beats the level out of fold by two standard errors), and inside it one per
        calibration group with at least MIN_GROUP_FEEDBACK answers (``fit_grouped_calibrator``;
        a group with fewer gets the pooled one), store it as the variant's next version
        and make it current. Returns what was stored. Variants an operator holds
        (calibrator_choice.py: after a rollback) are left alone."""
        data = self.dataset()
        fitted: dict[str, Calibrator] = {}
        if not len(data):
            return fitted
        now = self.clock()
        present = sorted(set(data.variants.tolist()))
        held = self.choices.held_variants(present)
        for variant in present:
            if variants is not None and variant not in variants:
                continue
            if variant in held:
                instruments.CALIBRATOR_REFITS_HELD.labels(variant).inc()
                continue
            rows = data.variants == variant
            sample = FeedbackSample.create(data.probs[rows], labels=data.labels[rows], correct=data.correct[rows],
                                           weights=data.weights[rows])
            version = self.store.next_calibrator_version(variant)
            groups = feedback_groups(data.calibration_groups[rows], data.account_ids[rows],
                                     self._current_groups(data.account_ids[rows]))
            calibrator = fit_grouped_calibrator(sample, data.model_sessions[rows], groups, version=version)
            calibrator = replace(calibrator, training={**calibrator.training, "fitted_at": now,
                                                       "received_through": float(data.received_at[rows].max())})
            # Held meanwhile (a rollback while this fit ran): not stored, the choice stays.
            if self.store.save_calibrator(variant, version, calibrator.to_json(), now,
                                          unless_held_by=choice_key(variant)):
                fitted[variant] = calibrator
                log.info("calibrator fitted", extra={"fields": {"variant": variant, "version": version,
                                                                "method": calibrator.method, "n": len(sample)}})
        return fitted

    def _current_groups(self, account_ids: Any) -> dict[str, str] | None:
        """Each account's calibration group now (its newest prediction's), when feedback is
        fitted in the household's current group (FEEDBACK_GROUP_OF)."""
        if FEEDBACK_GROUP_OF != "household":
            return None
        return self.store.current_calibration_groups(sorted(set(np.asarray(account_ids).tolist())))

    def recalibrate_if_due(self) -> dict[str, Calibrator]:
        """Recalibrate the variants with at least ``recalibrate_min_new`` feedback rows
        more than their current calibrator was fitted on."""
        data, cut = self._labelled()
        if not len(data):
            return {}
        current = self.current_calibrators()
        names, counts = np.unique(data.variants, return_counts=True)

        def new_since_fit(v: str, n: int) -> int:
            training = current[v].training if v in current else {}
            if cut and "received_through" in training:
                # A full window holds as many rows as the fit read, new ones or not: count
                # those received after the last one the fit read instead.
                return int(np.count_nonzero(data.received_at[data.variants == v] > training["received_through"]))
            return n - int(training.get("n_all", training.get("n", 0)))
        due = [str(v) for v, n in zip(names, counts) if new_since_fit(v, int(n)) >= self.policy.recalibrate_min_new]
        return self.recalibrate(due) if due else {}

    def report(self, group_by: str, bins: int) -> CalibrationReport:
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
                  + _group_reports(names, self.calibrated_probs(data, stored), data, n_bins, CALIBRATED_PREFIX))
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
        # No prediction: unknown, not 0 (instruments.FEEDBACK_RATE says why).
        instruments.FEEDBACK_RATE.set(with_feedback / predictions if predictions else float("nan"))
        data = self.dataset()
        if not len(data):
            return
        calibrated = self.calibrated_probs(data)
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


def _group_names(data: LabelledPredictions, group_by: str) -> NDArray[np.str_]:
    if group_by == "variant":
        return data.variants
    if group_by == "household_size":
        return data.household_size.astype(str)
    if group_by == "cold_start":
        return np.where(data.cold_start, "cold", "warm")
    if group_by == "model_age":   # the calibrators' segments; "unknown" = recorded without it
        names = np.array([*segment_names(DEFAULT_SEGMENT_EDGES), "unknown"])
        return names[segment_of(data.model_sessions, DEFAULT_SEGMENT_EDGES)]
    if group_by == "calibration_group":   # the calibrators' groups; "default" = the group ""
        return np.where(data.calibration_groups == "", "default", data.calibration_groups)
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
