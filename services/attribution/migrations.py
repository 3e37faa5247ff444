"""Versioned schema of the attribution service."""

from services.common.storage.sql import Migration

MIGRATIONS = [
    Migration(1, "touchpoints and conversions", """
CREATE TABLE IF NOT EXISTS touchpoints (
    touchpoint_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    ts {double} NOT NULL,
    channel TEXT NOT NULL,
    campaign TEXT NOT NULL,
    person_id TEXT
);
CREATE INDEX IF NOT EXISTS touchpoints_account_ts ON touchpoints (account_id, ts);
CREATE TABLE IF NOT EXISTS conversions (
    conversion_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    ts {double} NOT NULL,
    kind TEXT NOT NULL,
    value {double} NOT NULL,
    device_id TEXT
);
CREATE INDEX IF NOT EXISTS conversions_account_ts ON conversions (account_id, ts)
"""),
]
