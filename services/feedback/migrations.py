"""Versioned schema of the feedback service."""

from services.common.storage.sql import Migration

MIGRATIONS = [
    Migration(1, "predictions and feedback", """
CREATE TABLE IF NOT EXISTS predictions (
    prediction_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    person_id TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    model_variant TEXT NOT NULL,
    model_version {bigint} NOT NULL,
    ts {double} NOT NULL,
    cold_start INTEGER NOT NULL,
    household_size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_account ON predictions (account_id, ts);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY,
    prediction_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    true_person_id TEXT,
    weight {double} NOT NULL,
    ts {double} NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_prediction ON feedback (prediction_id)
"""),
]
