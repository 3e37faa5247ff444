"""From stored feedback rows to the arrays the domain metrics take (pure, no I/O).

One row of the result per *prediction* that received feedback: the signals about it are
combined by ``signals.interpret_feedback`` (strongest labelled signal wins, else the
implicit ones vote), and its probability vector becomes one row of a zero-padded matrix
whose **column 0 is the predicted person** (the stored ``person_id``), followed by the
other persons in name order. The service only accepts predictions whose ``person_id``
is a most probable person (intake.validate_predictions), and ``argmax`` breaks ties to the
lowest index, so the domain's "predicted = argmax" convention and the stored predicted
person always agree, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.feedback.domain.metrics import UNKNOWN_LABEL
from services.feedback.domain.signals import (
    LABELLED_KINDS,
    FeedbackRecord,
    SignalKind,
    SignalWeights,
    align_evidence,
    interpret_feedback,
)
from services.feedback.store import FeedbackJoined, PredictionRecord


@dataclass(frozen=True)
class LabelledPredictions:
    """Predictions with feedback, aligned arrays of length n.

    ``probs`` (n, K) with the predicted person in column 0; ``labels`` column of the true
    person or ``UNKNOWN_LABEL``; ``correct`` 0/1; ``weights`` evidence weights;
    ``variants``, ``household_size``, ``cold_start``, ``account_ids``, ``prediction_ids``;
    ``ts`` the latest feedback time (client clock) and ``received_at`` the latest storage
    time (server clock) per prediction; ``model_sessions`` the sessions the prediction's
    model had seen (0 = unknown); ``calibration_groups`` the group clustering put it in
    ("" = the default group)."""

    probs: NDArray[np.float64]
    labels: NDArray[np.int64]
    correct: NDArray[np.float64]
    weights: NDArray[np.float64]
    variants: NDArray[np.str_]
    household_size: NDArray[np.int64]
    cold_start: NDArray[np.bool_]
    account_ids: NDArray[np.str_]
    prediction_ids: NDArray[np.str_]
    ts: NDArray[np.float64]
    received_at: NDArray[np.float64]
    model_sessions: NDArray[np.int64]
    calibration_groups: NDArray[np.str_]

    def __len__(self) -> int:
        return int(self.prediction_ids.shape[0])

    @property
    def confidence(self) -> NDArray[np.float64]:
        return self.probs.max(axis=1) if len(self) else np.zeros(0)

    def subset(self, rows: NDArray[np.bool_] | NDArray[np.int64]) -> "LabelledPredictions":
        return LabelledPredictions(
            self.probs[rows], self.labels[rows], self.correct[rows], self.weights[rows], self.variants[rows],
            self.household_size[rows], self.cold_start[rows], self.account_ids[rows], self.prediction_ids[rows],
            self.ts[rows], self.received_at[rows], self.model_sessions[rows], self.calibration_groups[rows])


def persons_of(prediction: PredictionRecord) -> list[str]:
    """Column order of a prediction's vector: the predicted person first, then by name."""
    return [prediction.person_id, *sorted(p for p in prediction.probabilities if p != prediction.person_id)]


def signal_label(kind: SignalKind, predicted_person: str, true_person_id: str | None) -> str | None:
    """The person a signal names: a confirmation names the predicted person; corrections
    and switches name ``true_person_id``; implicit signals name nobody."""
    if kind == SignalKind.PROFILE_CONFIRMED:
        return predicted_person
    if kind in LABELLED_KINDS:
        return true_person_id
    return None


def build_dataset(rows: Sequence[FeedbackJoined], weights: SignalWeights = SignalWeights()) -> LabelledPredictions:
    """Combine feedback signals per prediction and align them to padded vectors."""
    predictions: dict[str, PredictionRecord] = {}
    latest_ts: dict[str, float] = {}
    latest_received: dict[str, float] = {}
    records: list[FeedbackRecord] = []
    for row in rows:
        p = row.prediction
        kind = SignalKind(row.kind)
        predictions.setdefault(p.prediction_id, p)
        latest_ts[p.prediction_id] = max(latest_ts.get(p.prediction_id, row.ts), row.ts)
        latest_received[p.prediction_id] = max(latest_received.get(p.prediction_id, row.received_at),
                                               row.received_at)
        records.append(FeedbackRecord(p.prediction_id, kind, p.person_id,
                                      signal_label(kind, p.person_id, row.true_person_id), row.ts))
    evidence = interpret_feedback(records, weights)
    ids = [e.prediction_id for e in evidence]
    chosen = [predictions[i] for i in ids]
    persons = [persons_of(p) for p in chosen]
    aligned = align_evidence(evidence, ids, persons)
    width = max((len(c) for c in persons), default=1)
    probs = np.zeros((len(ids), width))
    for i, (p, columns) in enumerate(zip(chosen, persons)):
        probs[i, :len(columns)] = [p.probabilities[name] for name in columns]
    # align_evidence keeps evidence order, and every evidence item matches (ids built from it).
    order = aligned.rows
    return LabelledPredictions(
        probs=probs[order],
        labels=np.where(aligned.labels >= 0, aligned.labels, UNKNOWN_LABEL).astype(np.int64),
        correct=aligned.correct,
        weights=aligned.weights,
        variants=np.array([chosen[i].model_variant for i in order], dtype=str).reshape(-1),
        household_size=np.array([chosen[i].household_size for i in order], dtype=np.int64).reshape(-1),
        cold_start=np.array([chosen[i].cold_start for i in order], dtype=bool).reshape(-1),
        account_ids=np.array([chosen[i].account_id for i in order], dtype=str).reshape(-1),
        prediction_ids=np.array([ids[i] for i in order], dtype=str).reshape(-1),
        ts=np.array([latest_ts[ids[i]] for i in order], dtype=np.float64).reshape(-1),
        received_at=np.array([latest_received[ids[i]] for i in order], dtype=np.float64).reshape(-1),
        model_sessions=np.array([chosen[i].model_sessions for i in order], dtype=np.int64).reshape(-1),
        calibration_groups=np.array([chosen[i].calibration_group for i in order], dtype=object).reshape(-1).astype(str),
    )
