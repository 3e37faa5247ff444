"""Clustering's prediction outbox (services/clustering/prediction_log.py) after a feedback
outage: predictions made once feedback is back are delivered within the gateway's
prediction wait (HEARTH_FEEDBACK_PREDICTION_WAIT_S, 2 s), however long the outage was."""

from __future__ import annotations

import threading
import time

from services.clustering.migrations import MIGRATIONS
from services.clustering.prediction_log import PredictionLog
from services.common.predictions import PredictionRecord
from services.common.storage.sql import SqliteDatabase, migrate

PREDICTION_WAIT_S = 2.0


def _record(pid: str) -> PredictionRecord:
    return PredictionRecord(pid, "acc-1", "s-1", "p1", {"p1": 1.0}, "gmm", 1, time.time(), False, 1)


def test_a_prediction_made_after_a_feedback_outage_is_delivered_within_the_wait(tmp_path):
    db = SqliteDatabase(tmp_path / "clustering.db")
    migrate(db, MIGRATIONS)
    up = threading.Event()
    delivered: dict[str, float] = {}

    def send(request):
        if not up.is_set():
            raise ConnectionError("feedback unreachable")
        for r in request.predictions:
            delivered.setdefault(r.prediction_id, time.monotonic())

    log = PredictionLog(db, send, forward_interval_s=0.05)
    try:
        log.record([_record("pr-during")])
        time.sleep(3.5)                      # the outage: attempts keep failing
        up.set()
        made = time.monotonic()
        log.record([_record("pr-after")])    # assigned right after feedback is back
        deadline = made + 8
        while "pr-after" not in delivered and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "pr-after" in delivered and "pr-during" in delivered
        assert delivered["pr-after"] - made < PREDICTION_WAIT_S, delivered["pr-after"] - made
    finally:
        log.close()
        db.close()
