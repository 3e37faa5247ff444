"""Feedback signals: from what a household did to (label or correctness, weight).

A prediction says "session S was watched by person p". Feedback arrives later, in
kinds of different strength:

=========================  ======  ========  ===============================================
kind                       weight  label?    meaning for the prediction
=========================  ======  ========  ===============================================
profile_confirmed          1.0     yes       the viewer confirmed who was watching: ground truth
profile_corrected          1.0     yes       the viewer said it was someone else, and who: ground truth
profile_switched           0.8     yes       the viewer switched to another person's profile;
                                             usually "the prediction was wrong, it was them",
                                             but people also switch when handing the device over
profile_hint               0.5     yes       the client sent ``profile_hint`` with the events;
                                             profiles are often shared, so only half-trusted
continued_recommendation   0.3     no (+)    kept watching a title recommended *to the predicted
                                             person*: weak evidence the prediction was right
abandoned_quickly          0.2     no (-)    stopped such a title within the abandon window:
                                             weak evidence it was wrong (titles get abandoned
                                             for many other reasons, hence weaker than +)
=========================  ======  ========  ===============================================

Combining several signals about one prediction (``interpret_feedback``):
1. If any *labelled* signal exists, the strongest one decides (higher weight wins;
   equal weights: the latest wins). Label = its person; correct = (person ==
   predicted person); weight = its weight. Implicit signals are then ignored: they
   cannot overrule someone saying who was watching.
2. Otherwise the implicit signals vote: net = sum(+w for positive, -w for negative).
   net == 0 gives no evidence; else correct = net > 0 and weight =
   min(|net|, ``implicit_cap``) so that piled-up implicit signals never reach the
   weight of an explicit confirmation.

Weights are configurable (``SignalWeights``); the defaults above are the documented ones
(docs/feedback.md). The output is what the metrics and recalibration consume.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from services.feedback.domain.errors import InvalidArgument
from services.feedback.domain.metrics import UNKNOWN_LABEL


class SignalKind(StrEnum):
    PROFILE_CONFIRMED = "profile_confirmed"
    PROFILE_CORRECTED = "profile_corrected"
    PROFILE_SWITCHED = "profile_switched"
    PROFILE_HINT = "profile_hint"
    CONTINUED_RECOMMENDATION = "continued_recommendation"
    ABANDONED_QUICKLY = "abandoned_quickly"


LABELLED_KINDS = frozenset(
    {SignalKind.PROFILE_CONFIRMED, SignalKind.PROFILE_CORRECTED, SignalKind.PROFILE_SWITCHED, SignalKind.PROFILE_HINT}
)
POSITIVE_KINDS = frozenset({SignalKind.CONTINUED_RECOMMENDATION})
NEGATIVE_KINDS = frozenset({SignalKind.ABANDONED_QUICKLY})


@dataclass(frozen=True)
class SignalWeights:
    """Evidence weight per signal kind (see the module table) and the cap for implicit votes."""

    profile_confirmed: float = 1.0
    profile_corrected: float = 1.0
    profile_switched: float = 0.8
    profile_hint: float = 0.5
    continued_recommendation: float = 0.3
    abandoned_quickly: float = 0.2
    implicit_cap: float = 0.4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or not np.isfinite(value) or not 0.0 < value <= 1.0:
                raise InvalidArgument(name, f"weight must lie in (0, 1], got {value!r}")

    def of(self, kind: SignalKind) -> float:
        return float(getattr(self, kind.value))


@dataclass(frozen=True)
class PlaybackThresholds:
    """When a play of a recommended title counts as continued or abandoned (seconds)."""

    abandon_within_s: float = 120.0
    continue_after_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0.0 < self.abandon_within_s < self.continue_after_s:
            raise InvalidArgument("abandon_within_s", "need 0 < abandon_within_s < continue_after_s")


def classify_playback(
    recommended_to_predicted: bool, watched_s: float, thresholds: PlaybackThresholds = PlaybackThresholds()
) -> SignalKind | None:
    """Implicit signal from one play of a title, or ``None`` when it says nothing.

    Only titles recommended to the predicted person carry information about the
    prediction; between the two windows the play is ambiguous and ignored.
    """
    if not np.isfinite(watched_s) or watched_s < 0:
        raise InvalidArgument("watched_s", f"must be a finite number >= 0, got {watched_s!r}")
    if not recommended_to_predicted:
        return None
    if watched_s < thresholds.abandon_within_s:
        return SignalKind.ABANDONED_QUICKLY
    if watched_s >= thresholds.continue_after_s:
        return SignalKind.CONTINUED_RECOMMENDATION
    return None


@dataclass(frozen=True)
class FeedbackRecord:
    """One feedback signal about one prediction.

    ``person`` is required for labelled kinds (the person the viewer confirmed, switched
    to, or hinted) and must be absent for implicit ones. ``ts`` orders signals of the
    same prediction (any monotone clock, e.g. Unix seconds).
    """

    prediction_id: str
    kind: SignalKind
    predicted_person: str
    person: str | None = None
    ts: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.prediction_id, str) or not self.prediction_id:
            raise InvalidArgument("prediction_id", "must be a non-empty string")
        try:
            object.__setattr__(self, "kind", SignalKind(self.kind))
        except ValueError:
            raise InvalidArgument("kind", f"unknown signal kind {self.kind!r}") from None
        if not isinstance(self.predicted_person, str) or not self.predicted_person:
            raise InvalidArgument("predicted_person", "must be a non-empty string")
        if self.kind in LABELLED_KINDS and not self.person:
            raise InvalidArgument("person", f"is required for {self.kind.value}")
        if self.kind not in LABELLED_KINDS and self.person is not None:
            raise InvalidArgument("person", f"must be empty for implicit signal {self.kind.value}")
        if not np.isfinite(self.ts):
            raise InvalidArgument("ts", "must be finite")


@dataclass(frozen=True)
class Evidence:
    """What the feedback on one prediction says: correctness, maybe the true person, and weight."""

    prediction_id: str
    correct: bool
    weight: float
    label: str | None
    source: SignalKind
    signals: int = field(default=1)


def interpret_feedback(records: Iterable[FeedbackRecord], weights: SignalWeights = SignalWeights()) -> list[Evidence]:
    """Combine feedback records into at most one ``Evidence`` per prediction (rules in module doc).

    The output keeps the order in which predictions first appear in ``records``.
    Records of one prediction must agree on ``predicted_person``.
    """
    by_prediction: dict[str, list[FeedbackRecord]] = {}
    for record in records:
        if not isinstance(record, FeedbackRecord):
            raise InvalidArgument("records", f"expected FeedbackRecord, got {type(record).__name__}")
        by_prediction.setdefault(record.prediction_id, []).append(record)

    evidence: list[Evidence] = []
    for prediction_id, group in by_prediction.items():
        predicted = {r.predicted_person for r in group}
        if len(predicted) > 1:
            raise InvalidArgument("predicted_person", f"records of prediction {prediction_id!r} disagree: {sorted(predicted)}")
        labelled = [r for r in group if r.kind in LABELLED_KINDS]
        if labelled:
            best = max(labelled, key=lambda r: (weights.of(r.kind), r.ts))
            evidence.append(
                Evidence(
                    prediction_id=prediction_id,
                    correct=best.person == best.predicted_person,
                    weight=weights.of(best.kind),
                    label=best.person,
                    source=best.kind,
                    signals=len(group),
                )
            )
            continue
        net = sum(weights.of(r.kind) if r.kind in POSITIVE_KINDS else -weights.of(r.kind) for r in group)
        if abs(net) < 1e-12:
            continue  # the implicit signals cancel out: no evidence either way
        strongest = max(group, key=lambda r: (weights.of(r.kind), r.ts))
        evidence.append(
            Evidence(
                prediction_id=prediction_id,
                correct=net > 0,
                weight=min(abs(net), weights.implicit_cap),
                label=None,
                source=strongest.kind,
                signals=len(group),
            )
        )
    return evidence


@dataclass(frozen=True)
class AlignedEvidence:
    """Evidence joined to prediction rows, as arrays the metrics take directly.

    ``rows``: index into the prediction arrays; ``labels``: column of the true person or
    ``UNKNOWN_LABEL`` (no label, or a person not in the prediction's vector);
    ``correct``: 0/1; ``weights``: evidence weights. Evidence about unknown predictions
    is counted in ``unmatched`` and dropped.
    """

    rows: NDArray[np.int64]
    labels: NDArray[np.int64]
    correct: NDArray[np.float64]
    weights: NDArray[np.float64]
    unmatched: int


def align_evidence(
    evidence: Sequence[Evidence], prediction_ids: Sequence[str], persons: Sequence[Sequence[str]]
) -> AlignedEvidence:
    """Map evidence onto predictions: ``persons[i]`` names the columns of prediction ``i``'s vector."""
    if len(prediction_ids) != len(persons):
        raise InvalidArgument("persons", f"needs one person list per prediction ({len(prediction_ids)}), got {len(persons)}")
    index = {pid: i for i, pid in enumerate(prediction_ids)}
    if len(index) != len(prediction_ids):
        raise InvalidArgument("prediction_ids", "must be unique")
    rows: list[int] = []
    labels: list[int] = []
    correct: list[float] = []
    weights: list[float] = []
    unmatched = 0
    for item in evidence:
        row = index.get(item.prediction_id)
        if row is None:
            unmatched += 1
            continue
        columns = list(persons[row])
        label = columns.index(item.label) if item.label is not None and item.label in columns else UNKNOWN_LABEL
        rows.append(row)
        labels.append(label)
        correct.append(1.0 if item.correct else 0.0)
        weights.append(item.weight)
    return AlignedEvidence(
        rows=np.asarray(rows, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        correct=np.asarray(correct, dtype=np.float64),
        weights=np.asarray(weights, dtype=np.float64),
        unmatched=unmatched,
    )
