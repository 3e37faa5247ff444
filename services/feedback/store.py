"""The feedback service's repository: the prediction log and feedback."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.storage.cache import Cache, MemoryCache
from services.common.storage.sql import Database, migrate
from services.feedback.migrations import MIGRATIONS


@dataclass(frozen=True)
class PredictionRecord:
    prediction_id: str
    account_id: str
    session_id: str
    person_id: str
    probabilities: dict[str, float]
    model_variant: str
    model_version: int
    ts: float
    cold_start: bool
    household_size: int


class FeedbackStore:
    def __init__(self, db: Database, cache: Cache | None = None) -> None:
        self.db = db
        self.cache = cache or MemoryCache("feedback")

    def migrate(self) -> list[int]:
        return migrate(self.db, MIGRATIONS)

    def record_predictions(self, items: Sequence[PredictionRecord]) -> tuple[int, int]:
        with self.db.transaction() as tx:
            accepted = tx.executemany(
                "INSERT INTO predictions (prediction_id, account_id, session_id, person_id, probabilities, "
                "model_variant, model_version, ts, cold_start, household_size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (prediction_id) DO NOTHING",
                [(p.prediction_id, p.account_id, p.session_id, p.person_id,
                  json.dumps(p.probabilities, sort_keys=True), p.model_variant, p.model_version, p.ts,
                  int(p.cold_start), p.household_size) for p in items])
        return accepted, len(items) - accepted
