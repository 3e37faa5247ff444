"""Versioned schema of the attribution service."""

from services.common.erasure_fences import ERASURE_FENCES_SQL
from services.common.field_crypto import HOUSEHOLD_ERASURES_SQL, HOUSEHOLD_KEY_EPOCHS_SQL
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
    # Touchpoint and conversion ids are the sender's, unique only within a household:
    # another household reusing one is a different record, not a duplicate. Primary keys
    # become (account_id, id), by a table rebuild (portable to SQLite and PostgreSQL).
    Migration(2, "touchpoint and conversion ids scoped per household", """
CREATE TABLE touchpoints_v2 (
    touchpoint_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    ts {double} NOT NULL,
    channel TEXT NOT NULL,
    campaign TEXT NOT NULL,
    person_id TEXT,
    PRIMARY KEY (account_id, touchpoint_id)
);
INSERT INTO touchpoints_v2 (touchpoint_id, account_id, device_id, ts, channel, campaign, person_id)
SELECT touchpoint_id, account_id, device_id, ts, channel, campaign, person_id FROM touchpoints;
DROP TABLE touchpoints;
ALTER TABLE touchpoints_v2 RENAME TO touchpoints;
CREATE INDEX IF NOT EXISTS touchpoints_account_ts ON touchpoints (account_id, ts);
CREATE TABLE conversions_v2 (
    conversion_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    ts {double} NOT NULL,
    kind TEXT NOT NULL,
    value {double} NOT NULL,
    device_id TEXT,
    PRIMARY KEY (account_id, conversion_id)
);
INSERT INTO conversions_v2 (conversion_id, account_id, ts, kind, value, device_id)
SELECT conversion_id, account_id, ts, kind, value, device_id FROM conversions;
DROP TABLE conversions;
ALTER TABLE conversions_v2 RENAME TO conversions;
CREATE INDEX IF NOT EXISTS conversions_account_ts ON conversions (account_id, ts)
"""),
    # How many households this store has erased: a write reads it and drops cached data
    # keys when it moved, so a replica that did not run a household's Erase cannot keep
    # writing for it (services/common/field_crypto.py, docs/privacy.md "Order").
    Migration(3, "household erasures", HOUSEHOLD_ERASURES_SQL),
    # Keyed digests of the ids of touchpoints and conversions a device, person or window
    # erasure deleted (never the id or anything else of the record): one sent again is a
    # duplicate, not stored (AttributionStore; docs/privacy.md "An erased scope stays
    # erased"). A household erasure drops its rows; the retention purge those older than
    # its window.
    Migration(4, "erased record digests", """
CREATE TABLE IF NOT EXISTS erased_records (
    account_id TEXT NOT NULL,
    digest {blob} NOT NULL,
    erased_at {double} NOT NULL,
    PRIMARY KEY (account_id, digest)
);
CREATE INDEX IF NOT EXISTS erased_records_at ON erased_records (erased_at)
"""),
    # Each household's count of re-keys (DataHolder/Rekey, a rotation of its data key): a
    # write reads its households' counts and drops the keys it cached of one whose count
    # moved (services/common/field_crypto.py). Per household (session 27): the global
    # count of household erasures made every replica refetch every household's key.
    Migration(5, "household key epochs", HOUSEHOLD_KEY_EPOCHS_SQL),
    # What a device or window erasure fenced off (session 31): touchpoints and conversions
    # the scope recorded up to the erasure that arrive after it are refused
    # (services/common/erasure_fences.py; docs/privacy.md "An erased scope stays erased").
    Migration(6, "erasure fences", ERASURE_FENCES_SQL),
]
