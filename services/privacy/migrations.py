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
    # 2-9: deletion jobs and data keys (deletion engineer); 10-19: audit log.
    # deletion_jobs: one row per job; ``job_json`` is deletion.job_to_dict (the domain's
    # state machine), ``erasures_json`` the per-kind counts each service reported,
    # ``next_due`` the earliest time the worker should look at it again (NULL when
    # terminal), ``lease_until`` the claim of the replica working on it.
    Migration(2, "deletion jobs", """
CREATE TABLE IF NOT EXISTS deletion_jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    state TEXT NOT NULL,
    next_due {double},
    lease_until {double} NOT NULL DEFAULT 0,
    version {bigint} NOT NULL,
    job_json TEXT NOT NULL,
    erasures_json TEXT NOT NULL,
    receipt_json TEXT,
    created_at {double} NOT NULL
);
CREATE INDEX IF NOT EXISTS deletion_jobs_due ON deletion_jobs (state, next_due);
CREATE INDEX IF NOT EXISTS deletion_jobs_account ON deletion_jobs (account_id, created_at)
"""),
    # data_keys: the wrapped per-household DEKs (crypto.WrappedDek). A crypto-shred
    # overwrites ``wrapped`` with an empty value in place (tombstone).
    Migration(3, "data keys", """
CREATE TABLE IF NOT EXISTS data_keys (
    account_id TEXT NOT NULL,
    dek_version INTEGER NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped {blob} NOT NULL,
    created_at TEXT NOT NULL,
    destroyed_at TEXT,
    PRIMARY KEY (account_id, dek_version)
)
"""),
    # trace_context: the W3C carrier (JSON) of the RequestDeletion call, so the worker's
    # fan-out joins the request's trace even after a restart (telemetry.context_carrier).
    Migration(4, "deletion job trace context", """
ALTER TABLE deletion_jobs ADD COLUMN trace_context TEXT NOT NULL DEFAULT ''
"""),
    # deletion_clocks: each deletion worker's last measurement of its clock against the
    # database server's (PostgreSQL; DeletionCoordinator.clock_disagrees): ``offset_s`` its
    # clock minus the server's, ``measured_at`` the server's time then. A worker off the
    # server's clock still takes leases when every live worker is off by the same amount
    # (the server's clock is the odd one out). No personal data.
    Migration(5, "deletion worker clocks", """
CREATE TABLE IF NOT EXISTS deletion_clocks (
    worker TEXT PRIMARY KEY,
    offset_s {double} NOT NULL,
    measured_at {double} NOT NULL
)
"""),
    # data_keys.retired_at: when every store re-encrypted the household's data from this
    # version to a newer one (a data key rotation, keys/rotation.py). Only version 1 is
    # ever retired and kept, when a data holder of a release before session 27 still keys
    # erased-id digests with it; otherwise it is destroyed (tombstone) like every older
    # version. NULL: the version may still hold data.
    Migration(6, "data key retirement", """
ALTER TABLE data_keys ADD COLUMN retired_at TEXT
"""),
    # The rotation sweep (every replica, every minute) looks only at households that ever
    # had a second version: found by this index, not by a scan of every household's key.
    Migration(7, "data key versions", """
CREATE INDEX IF NOT EXISTS data_keys_version ON data_keys (dek_version)
"""),
    # digest_keys: each household's erased-id digest key (keys.domain.DIGEST_KEY_VERSION),
    # wrapped like a data key, so a data key rotation can destroy version 1 (session 27).
    # A household's row is made with its first data key, or derived from its live version
    # 1 on first use (KeyService.digest_key: households from before this migration, whose
    # digests were keyed from version 1, keep them valid). A shred tombstones it in place.
    Migration(8, "digest keys", """
CREATE TABLE IF NOT EXISTS digest_keys (
    account_id TEXT PRIMARY KEY,
    kek_id TEXT NOT NULL,
    wrapped {blob} NOT NULL,
    created_at TEXT NOT NULL,
    destroyed_at TEXT
)
"""),
    # rotation_jobs: batch data key rotations (keys/batch.py, ``hearth keys
    # rotate-households``), kept by the deletion jobs' store (DeletionJobStore with its own
    # table and codec): the same columns, ``account_id`` "*", ``job_json`` the batch (and,
    # until session 28, each household's outcome: now in rotation_job_households, 21),
    # ``erasures_json`` unused ('{}').
    Migration(9, "batch data key rotation jobs", """
CREATE TABLE IF NOT EXISTS rotation_jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    state TEXT NOT NULL,
    next_due {double},
    lease_until {double} NOT NULL DEFAULT 0,
    version {bigint} NOT NULL,
    job_json TEXT NOT NULL,
    erasures_json TEXT NOT NULL,
    receipt_json TEXT,
    created_at {double} NOT NULL,
    trace_context TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS rotation_jobs_due ON rotation_jobs (state, next_due)
"""),
    # rotation_rekeys (20: versions 10-19 are the audit log's, below): a rotation's durable
    # progress per data-holding service (session 28,
    # keys/rotation.py ``RekeyMarkers``): the store re-encrypted the household under
    # ``dek_version`` (a Rekey pass found nothing older) and, once ``purged`` is 1, purged
    # its old ciphertexts after that (``purges``: the steps, JSON). A resumed rotation (the
    # sweep, a re-run, a batch claimed again) skips the stores marked purged instead of
    # calling Rekey again (on PostgreSQL a VACUUM FULL each). Deleted when the rotation
    # retires its older versions.
    Migration(20, "data key rotation progress per store", """
CREATE TABLE IF NOT EXISTS rotation_rekeys (
    account_id TEXT NOT NULL,
    dek_version INTEGER NOT NULL,
    service TEXT NOT NULL,
    reencrypted {bigint} NOT NULL,
    keyed_apart INTEGER NOT NULL,
    purged INTEGER NOT NULL,
    purges TEXT NOT NULL,
    marked_at {double} NOT NULL,
    PRIMARY KEY (account_id, dek_version, service)
)
"""),
    # rotation_job_households: a batch rotation job's outcome per household (session 28,
    # keys/batch.py ``RotationJobStore``), ``outcome_json`` one household's; the job's row
    # in rotation_jobs keeps only its header. A step writes its household's row, not the
    # whole job.
    Migration(21, "batch data key rotation outcomes per household", """
CREATE TABLE IF NOT EXISTS rotation_job_households (
    job_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    outcome_json TEXT NOT NULL,
    PRIMARY KEY (job_id, account_id)
)
"""),
    # ledger_exports: the last successful `hearth ledger export` (session 34): written by
    # the export after its file is in place, read by every privacy replica for
    # hearth_ledger_last_export_timestamp_seconds (HearthLedgerExportStale). One row per
    # ``name`` ("deletion-ledger"). No personal data.
    Migration(22, "off-site ledger exports", """
CREATE TABLE IF NOT EXISTS ledger_exports (
    name TEXT PRIMARY KEY,
    exported_at {double} NOT NULL,
    export_id TEXT NOT NULL,
    entries {bigint} NOT NULL
)
"""),
]


# The audit log's tables (versions 10-19) live next to their store; merged in version
# order so that migrations added here by other work keep applying first.
from services.privacy.audit.store import AUDIT_MIGRATIONS  # noqa: E402

MIGRATIONS = sorted([*MIGRATIONS, *AUDIT_MIGRATIONS], key=lambda m: m.version)
