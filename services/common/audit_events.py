"""The audit log's event types: the one vocabulary shared by the audit client every
service uses (services/common/audit.py) and the log itself (services/privacy/audit/
domain.py). Pure: no dependencies, so the privacy domain can import it."""

from __future__ import annotations

import enum


class EventType(enum.StrEnum):
    """What happened. Values are stable wire names; add, never rename."""

    ASSIGN = "assign"
    INGEST = "ingest"
    READ_HOUSEHOLD = "read_household"
    EXPORT = "export"
    ATTRIBUTION_RUN = "attribution_run"
    DELETION_REQUESTED = "deletion_requested"
    DELETION_COMPLETED = "deletion_completed"
    DELETION_FAILED = "deletion_failed"
    CONSENT_CHANGE = "consent_change"
    RETENTION_PURGE = "retention_purge"
    AUTHENTICATION_FAILURE = "authentication_failure"
    PERMISSION_DENIED = "permission_denied"
    KEY_ROTATION = "key_rotation"
    KEY_DESTROYED = "key_destroyed"
    FLAG_CHANGE = "flag_change"
    MODEL_REFIT = "model_refit"
    FEEDBACK = "feedback"
    SECURITY_ALERT = "security_alert"
    RECEIPT_VERIFIED = "receipt_verified"
    AUDIT_EXPORT = "audit_export"
