"""Feedback's reads take no write lock (review33, the class of review28's consent read): the
flags (``current_flags``: GetVariants — a model refresh's batch of households —, GetExperiment,
a calibrator choice), a prediction (``prediction``: every RecordFeedback looks up its
prediction before its write) and the counts read in write transactions until review33 — on
SQLite ``BEGIN IMMEDIATE``, the database's one write lock — so each waited behind any write of
feedback's database (a forwarded batch of predictions, a calibrator fit's save) and, past the
30 s busy timeout, failed. Flags change by compare-and-swap on their version (insert_flags)."""

from __future__ import annotations

import time
from pathlib import Path

from services.common.predictions import PredictionRecord
from services.common.storage.sql import SqliteDatabase
from services.feedback.store import FeedbackStore
from tests.helpers.held_transaction import answered_beside_a_held_write


def test_feedbacks_reads_do_not_wait_for_a_write_in_progress(tmp_path: Path):
    db = SqliteDatabase(tmp_path / "feedback.db")
    try:
        store = FeedbackStore(db)
        store.migrate()
        now = time.time()
        store.record_predictions([PredictionRecord("pred-r", "acct-r", "s-1", "p1", {"p1": 1.0}, "gmm", 1,
                                                   now - 60, False, 1)])
        assert store.insert_flags("exp", 1, '{"v": 1}', "a reason", "admin", now)
        answers = answered_beside_a_held_write(db, lambda: (store.current_flags("exp").version,
                                                             store.prediction("pred-r").prediction_id, store.counts()))
        assert answers == (1, "pred-r", (1, 0))
    finally:
        db.close()
