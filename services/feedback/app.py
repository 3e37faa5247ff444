"""Use cases of the feedback service."""

from __future__ import annotations

import math

from services.clustering.domain.events import check_id, check_ts
from services.common.errors import InvalidArgument
from services.feedback.store import FeedbackStore, PredictionRecord

MAX_PREDICTIONS_PER_BATCH = 10_000


def validate_predictions(items: list[PredictionRecord]) -> list[PredictionRecord]:
    if len(items) > MAX_PREDICTIONS_PER_BATCH:
        raise InvalidArgument(f"at most {MAX_PREDICTIONS_PER_BATCH} per batch", "predictions")
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
        if abs(total - 1.0) > 1e-3:
            raise InvalidArgument("probabilities must sum to 1", f"{path}.probabilities")
        if p.person_id not in p.probabilities:
            raise InvalidArgument("must be one of the persons in probabilities", f"{path}.person_id")
    return items


class FeedbackApp:
    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    def record_predictions(self, items: list[PredictionRecord]) -> tuple[int, int]:
        return self.store.record_predictions(validate_predictions(items))
