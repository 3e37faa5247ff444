"""Settings of the privacy service: the shared ``ServiceSettings`` plus its own
variables, validated at start (a bad value names the variable).

| variable | default | meaning |
|---|---|---|
| `HEARTH_AUDIT_SIGNING_KEY` / `_FILE` | dev: generated | Ed25519 key signing audit tree heads, or a file holding it (services/privacy/audit/app.py) |
| `HEARTH_AUDIT_TREE_HEAD_HISTORY_S` | 60 | of the audit log's signed tree heads before the latest, the table keeps the last of each interval of this many seconds; 0 = every committed batch's (before session 30) |
| `HEARTH_RECEIPT_SIGNING_KEY` | dev: generated | Ed25519 key signing deletion receipts (PKCS#8 PEM or base64 of the 32-byte seed) |
| `HEARTH_KEKS` | dev: generated | master keys `id=<base64 32 bytes>,...` wrapping the per-household data keys |
| `HEARTH_ACTIVE_KEK` | the only KEK | id of the KEK new data keys are wrapped with (required with several) |
| `HEARTH_RETENTION_DAYS` | 90 | data older than this is purged by the scheduled retention job |
| `HEARTH_RETENTION_CHECK_S` | 3600 | how often the retention purge runs; 0 = off |
| `HEARTH_DELETION_POLL_S` | 1.0 | the deletion worker looks for due jobs at least this often |
| `HEARTH_DELETION_RETRY_BASE_S` / `_MAX_S` | 1 / 300 | retry backoff of a service that did not confirm |
| `HEARTH_DELETION_MAX_ATTEMPTS` | 1000 | after this many failed attempts of one service the job fails |
| `HEARTH_DELETION_ERASE_TIMEOUT_S` | 60 | deadline of one Erase call |
| `HEARTH_DEK_ROTATION_SETTLE_S` | 70 | a data key rotation waits this long after creating the new version before re-encrypting (shorter is unsafe with writes under way: tests only) |
| `HEARTH_DEK_ROTATION_SWEEP_S` | 60 | how often a replica finishes data key rotations a crash left under way; 0 = never |
| `HEARTH_AUDIT_BULK_READERS` | `{}` | expected bulk readers, JSON `{"<principal>": <households>}`: each principal's own `mass_household_reads` threshold (distinct households in 10 min) instead of 50 (audit/suspicious.py) |
| `HEARTH_DELETION_LEASE_S` | 10 | a replica working on a job holds it this long, renewed every third of it while it works (crash: another resumes it within this) |

Without `HEARTH_RECEIPT_SIGNING_KEY` / `HEARTH_KEKS` (development) the service generates
the keys once, stores them under `HEARTH_DATA_DIR` with mode 0600 and logs a warning:
production must configure both (from a secret store).
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from services.common.config import AtLeastOne, NonNegative, Positive, RetentionSettings, ServiceSettings


class PrivacySettings(RetentionSettings):
    # RetentionSettings: HEARTH_RETENTION_DAYS / _CHECK_S (shared with clustering).
    service_name: str = "privacy"
    audit_signing_key: SecretStr = SecretStr("")
    audit_signing_key_file: str = ""
    # Public keys the audit log's tree heads were signed with before the current key
    # (PEM blocks or base64, comma-separated): VerifyAudit checks those heads' signatures too.
    audit_previous_public_keys: str = ""
    # Stored tree head history: the last head of each interval of this many seconds (and
    # always the latest); 0 = every batch's head (audit/writer.py, _thins).
    audit_tree_head_history_s: NonNegative = 60.0
    # Expected bulk readers (principal -> its own mass_household_reads threshold; default
    # none): audit/suspicious.py DetectorThresholds.bulk_readers.
    audit_bulk_readers: dict[str, int] = Field(default_factory=dict)
    receipt_signing_key: str = ""
    keks: str = ""
    active_kek: str = ""
    deletion_poll_s: Positive = 1.0
    deletion_retry_base_s: Positive = 1.0
    deletion_retry_max_s: Positive = 300.0
    deletion_max_attempts: AtLeastOne = 1000
    deletion_erase_timeout_s: Positive = 60.0
    deletion_lease_s: Positive = 10.0
    # Data key rotation (keys/rotation.py): how long after a new version is created before
    # the stores re-encrypt (below REFRESH_S + the stores' key cache TTL + 5 s = 70 s a
    # store may still seal a value under the old version after the re-encryption, and the
    # old key's destruction would lose it: tests only), and how often a replica finishes
    # rotations left by a crash (0: never).
    dek_rotation_settle_s: NonNegative = 70.0
    dek_rotation_sweep_s: NonNegative = 60.0

    @field_validator("audit_bulk_readers", mode="before")
    @classmethod
    def _bulk_readers(cls, value: object) -> object:
        from services.privacy.audit.suspicious import check_bulk_readers

        return check_bulk_readers(value)


def privacy_settings(settings: ServiceSettings) -> PrivacySettings:
    """The privacy settings for ``settings`` plus the variables above from the environment."""
    from services.common import config

    return config.specialise(settings, PrivacySettings)
