"""Versioned schema of the privacy service."""

from services.common.storage.sql import Migration

MIGRATIONS = [
    Migration(1, "consent", """
CREATE TABLE IF NOT EXISTS consent (
    account_id TEXT PRIMARY KEY,
    processing INTEGER NOT NULL,
    attribution INTEGER NOT NULL,
    version {bigint} NOT NULL,
    updated_at {double} NOT NULL,
    updated_by TEXT NOT NULL
)
"""),
]
