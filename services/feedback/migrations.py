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
    # Migration 2: what the service needs beyond the prediction log.
    # - feedback.received_at: server clock at storage (the client's ``ts`` orders signals;
    #   received_at decides what is "new since the last calibrator / trigger").
    # - flags: one row per version of an experiment's flags (history kept, current = max
    #   version); the (experiment, version) primary key is the compare-and-swap.
    # - calibrators + calibrator_current: every fitted calibrator per (variant, version),
    #   and which version is in force (a pointer, so an operator can roll back).
    # - triggers: every retraining trigger fired and what became of its Refit request.
    Migration(2, "feedback received_at, flags, calibrators, triggers", """
ALTER TABLE feedback ADD COLUMN received_at {double} NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS feedback_account ON feedback (account_id, received_at);
CREATE INDEX IF NOT EXISTS feedback_true_person ON feedback (account_id, true_person_id);
CREATE INDEX IF NOT EXISTS predictions_person ON predictions (account_id, person_id);
CREATE TABLE IF NOT EXISTS flags (
    experiment TEXT NOT NULL,
    version {bigint} NOT NULL,
    flags_json TEXT NOT NULL,
    reason TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    ts {double} NOT NULL,
    audit_result TEXT,
    PRIMARY KEY (experiment, version)
);
CREATE TABLE IF NOT EXISTS calibrators (
    variant TEXT NOT NULL,
    version {bigint} NOT NULL,
    calibrator_json TEXT NOT NULL,
    fitted_at {double} NOT NULL,
    PRIMARY KEY (variant, version)
);
CREATE TABLE IF NOT EXISTS calibrator_current (
    variant TEXT PRIMARY KEY,
    version {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS triggers (
    trigger_id {serial_pk},
    kind TEXT NOT NULL,
    scope TEXT NOT NULL,
    scope_key TEXT NOT NULL,
    value {double} NOT NULL,
    threshold {double} NOT NULL,
    n {bigint} NOT NULL,
    ts {double} NOT NULL,
    refit_requested INTEGER NOT NULL,
    refit_result TEXT,
    refit_ts {double}
);
CREATE INDEX IF NOT EXISTS triggers_scope ON triggers (scope, scope_key, kind, ts)
"""),
    Migration(3, "device of each prediction", """
ALTER TABLE predictions ADD COLUMN device_id TEXT NOT NULL DEFAULT ''
"""),
    # Migration 4: the session each prediction is about, so that a window erasure takes
    # the predictions about the sessions it deletes, not those made in the window.
    Migration(4, "session span of each prediction", """
ALTER TABLE predictions ADD COLUMN session_start {double};
ALTER TABLE predictions ADD COLUMN session_end {double}
"""),
    # Migration 5: the sessions the model had seen when it answered (0 = unknown, rows
    # stored before), so calibrators are fitted per model-age segment.
    Migration(5, "model age of each prediction", """
ALTER TABLE predictions ADD COLUMN model_sessions {bigint} NOT NULL DEFAULT 0
"""),
    # Migration 6: feedback the user volunteered (RecordFeedbackRequest.unprompted) is
    # kept out of calibration; rows stored before were all treated as prompted.
    Migration(6, "unprompted feedback", """
ALTER TABLE feedback ADD COLUMN unprompted INTEGER NOT NULL DEFAULT 0
"""),
    # Migration 7: the calibration group clustering put each answer in ("" = the default
    # group, also every row stored before), so a calibrator is fitted per group. Part of
    # the prediction row, so an erasure that deletes the row deletes it too.
    Migration(7, "calibration group of each prediction", """
ALTER TABLE predictions ADD COLUMN calibration_group TEXT NOT NULL DEFAULT ''
"""),
]
