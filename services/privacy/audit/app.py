"""Use cases of the audit log inside the privacy service, and its wiring.

* ``AuditApp``: append (durable), query, proofs, verify, export; every committed entry
  is fed to the ``SuspiciousActivityDetector``; each alert becomes a ``security_alert``
  entry (principal ``svc:privacy``, resource ``principal:<who>``) and increments
  ``hearth_security_alerts_total{kind, threshold}``.
* ``LocalAuditTransport``: the privacy service's own ``AuditSink`` appends here
  directly (no RPC to itself).
* ``load_signing_key``: the Ed25519 key that signs tree heads (configuration below).
* ``build_audit(settings, db)``: everything ``__main__`` needs.

Signing key configuration, first match wins:

``HEARTH_AUDIT_SIGNING_KEY``       PEM (PKCS#8) or base64 of the 32-byte seed
``HEARTH_AUDIT_SIGNING_KEY_FILE``  a file holding the same (e.g. a mounted secret)
(neither)                          development: ``$HEARTH_DATA_DIR/audit-signing-key.pem``,
                                   generated at first start with mode 0600 (a warning
                                   is logged); the public key is written next to it as
                                   ``audit-signing-key.pub`` for ``hearth audit verify``.

Every replica of the privacy service must use the same key; configure it explicitly
in any deployment with more than one replica or an ephemeral disk. After a rotation,
``HEARTH_AUDIT_PREVIOUS_PUBLIC_KEYS`` lists the earlier keys' public halves so that
VerifyAudit checks the signatures of the heads they signed (``load_previous_public_keys``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from prometheus_client import Counter

from services.common import audit as audit_client
from services.common import identity
from services.common.audit import AuditRecord, AuditSink
from services.common.config import ConfigError
from services.common.errors import InvalidArgument
from services.common.storage.sql import Database
from services.privacy.audit.proofs import AuditProofs, AuditVerification
from services.privacy.audit.rows import StoredEntry, record_to_entry
from services.privacy.audit.store import AuditQuery, AuditStore
from services.privacy.audit.writer import AuditWriter
from services.privacy.audit.domain import AuditEntry, EventType, Role, SignedTreeHead
from services.privacy.keys.signing import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    generate_private_key,
    load_private_key,
    load_public_keys,
    private_key_to_pem,
    public_key_to_pem,
    publish_public_key,
)
from services.privacy.audit.suspicious import (AlertThreshold, DetectorThresholds, SecurityEventKind,
                                               SuspiciousActivityDetector)

log = logging.getLogger("hearth.privacy.audit")

# kind and whose threshold was crossed (``threshold``: default, or bulk_reader — an expected
# bulk reader past its own; session 36): both bounded, never the principal or a household
# (alerts HearthSecurityAlert, HearthBulkReaderOverThreshold).
SECURITY_ALERTS = Counter("hearth_security_alerts_total",
                          "Suspicious-activity alerts raised from the audit stream", ["kind", "threshold"])
for _kind in SecurityEventKind:   # at 0 from the start: the first alert is an increase
    SECURITY_ALERTS.labels(_kind.value, AlertThreshold.DEFAULT.value)
SECURITY_ALERTS.labels(SecurityEventKind.MASS_HOUSEHOLD_READS.value, AlertThreshold.BULK_READER.value)
KEY_ENV = "HEARTH_AUDIT_SIGNING_KEY"
KEY_FILE_ENV = "HEARTH_AUDIT_SIGNING_KEY_FILE"
PREVIOUS_KEYS_ENV = "HEARTH_AUDIT_PREVIOUS_PUBLIC_KEYS"
DEV_KEY_NAME = "audit-signing-key.pem"
DEV_PUBLIC_KEY_NAME = "audit-signing-key.pub"
SERVICE = "privacy"

# The mesh's own services read households as part of their job (attribution resolves
# persons for journeys, privacy gathers exports): counting those as "one principal reading
# many households" would alert on every export. Their authentication failures still count.
# Exempt are the components' own principals only (``svc:<name>``, role service: a name
# only that component's key may sign, never issued to an API key or a JWT subject —
# identity.reserved_principal_id, service_keys.may_vouch). Until session 34 the test was
# the service role alone, so any service-role API key (an ingest pipeline's, through the
# gateway's HTTP API; it holds read_household) read any number of households
# with no ``mass_household_reads`` alert (attack34); such a key is judged like anyone else.
_SERVICE_READS = frozenset({EventType.READ_HOUSEHOLD, EventType.EXPORT})


def _mesh_service_read(entry) -> bool:
    """An entry the detector skips: a household read or export by a mesh component."""
    return (entry.event_type in _SERVICE_READS and entry.role is Role.SERVICE
            and identity.reserved_principal_id(entry.principal))


def load_signing_key(configured: str = "", key_file: str = "", data_dir: str | Path = "var") -> Ed25519PrivateKey:
    """The tree-head signing key per the module docstring (``configured`` and
    ``key_file`` are the two settings, PrivacySettings.audit_signing_key / _file);
    ConfigError naming the variable when one is set but unusable."""
    if configured:
        try:
            return load_private_key(configured, argument=KEY_ENV)
        except ValueError as exc:
            raise ConfigError(f"invalid configuration:\n  {KEY_ENV}: {exc}") from None
    if key_file:
        try:
            return load_private_key(Path(key_file).read_text(), argument=KEY_FILE_ENV)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"invalid configuration:\n  {KEY_FILE_ENV}: {exc}") from None
    path = Path(data_dir) / DEV_KEY_NAME
    if path.exists():
        try:
            return load_private_key(path.read_text(), argument=str(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"invalid configuration:\n  {path}: {exc}") from None
    key = generate_private_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting together cannot both write a key; the loser
        # reads the winner's.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_private_key(path.read_text(), argument=str(path))
    with os.fdopen(fd, "w") as f:
        f.write(private_key_to_pem(key))
        f.flush()
        os.fsync(f.fileno())
    publish_public_key(path.parent / DEV_PUBLIC_KEY_NAME, key.public_key())
    log.warning("%s is not set: generated an audit signing key at %s (mode 0600) and its public "
                "key at %s. Development only: configure the key for production.",
                KEY_ENV, path, path.parent / DEV_PUBLIC_KEY_NAME)
    return key


def load_previous_public_keys(configured: str) -> list[Ed25519PublicKey]:
    """``HEARTH_AUDIT_PREVIOUS_PUBLIC_KEYS``: the public keys of earlier audit signing keys
    (PEM blocks and/or base64 raw keys, comma-separated); ConfigError naming the variable
    when one is unusable (a typo must not silently leave old heads unchecked)."""
    try:
        return load_public_keys(configured or "", argument=PREVIOUS_KEYS_ENV)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration:\n  {exc}") from None


class AuditApp:
    """The audit log of the privacy service. Construct after migrations; it starts the
    store (loads state, rebuilds the proof tree, starts the writer)."""

    def __init__(self, db: Database, signing_key: Ed25519PrivateKey, *,
                 thresholds: DetectorThresholds | None = None,
                 earlier_public_keys: Sequence[Ed25519PublicKey] = (), **store_options) -> None:
        """``earlier_public_keys``: the keys tree heads were signed with before
        ``signing_key`` (``HEARTH_AUDIT_PREVIOUS_PUBLIC_KEYS``), whose signatures
        VerifyAudit then checks too."""
        self.detector = SuspiciousActivityDetector(thresholds)
        self.alerts = 0
        self.store = AuditStore(db)
        self.writer = AuditWriter(db, signing_key, after_commit=self._detect, **store_options).start()
        self.proofs = AuditProofs(self.store, self.writer, earlier_public_keys)

    @property
    def public_key_pem(self) -> str:
        return public_key_to_pem(self.writer.public_key)

    # -- writes ------------------------------------------------------------------------

    def append(self, records: Sequence[AuditRecord]) -> list[int]:
        """Append records built by ``audit.make_record`` (already validated); durable
        on return."""
        return self.writer.append(records)

    def append_untrusted(self, records: Sequence[AuditRecord],
                         caller: identity.Principal | None = None) -> list[int]:
        """AppendAudit: validate every record first (all or nothing: one bad record
        refuses the request before anything is written), note who reported records
        about someone else, then append durably. The entries built to validate are
        the ones appended (the writer only stamps their seqs)."""
        entries: list[AuditEntry] = []
        reporter = caller.id if caller is not None else None
        for i, record in enumerate(records):
            try:
                entries.append(record_to_entry(record, 0, reporter))
            except ValueError as exc:
                raise InvalidArgument(str(exc).split(": ", 1)[-1], f"records[{i}].{_field_of(exc)}") from None
        return self.writer.append_entries(entries, [r.record_id for r in records])

    def _detect(self, entries: Sequence[AuditEntry], seqs: Sequence[int]) -> list[AuditRecord]:
        """After-commit hook (writer thread): alerts for the committed entries
        (``entries[i]`` as prepared, committed at ``seqs[i]``)."""
        out: list[AuditRecord] = []
        observe = self.detector.observe
        alert_type = EventType.SECURITY_ALERT
        for entry, seq in zip(entries, seqs):
            if entry.event_type is alert_type or _mesh_service_read(entry):
                continue
            alerts = observe(entry)
            if not alerts:
                continue
            for alert in alerts:
                # An alert names the entry that triggered it, the one just observed,
                # whose seq field is still the placeholder.
                alert = replace(alert, seq=seq)
                SECURITY_ALERTS.labels(alert.kind.value, alert.threshold.value).inc()
                self.alerts += 1
                details = dict(alert.details(), role=entry.role.value)
                log.warning("security alert", extra={"fields": details})
                out.append(audit_client.make_record(
                    audit_client.SECURITY_ALERT, f"principal:{alert.principal}",
                    audit_client.SUCCESS, details,
                    principal=identity.service_principal(SERVICE), trace_id=entry.trace_id))
        return out

    # -- reads -------------------------------------------------------------------------

    def query(self, q: AuditQuery) -> tuple[list[StoredEntry], bool]:
        return self.store.query(q)

    def latest_sth(self) -> SignedTreeHead | None:
        return self.writer.latest_sth()

    def inclusion_proof(self, seq: int, tree_size: int = 0):
        return self.proofs.inclusion_proof(seq, tree_size)

    def consistency_proof(self, old_size: int, tree_size: int = 0):
        return self.proofs.consistency_proof(old_size, tree_size)

    def verify(self) -> AuditVerification:
        return self.proofs.verify()

    def export_lines(self) -> Iterator[str]:
        return self.store.export_lines(self.writer.latest_sth())

    def close(self) -> None:
        self.writer.close()


def _field_of(exc: ValueError) -> str:
    """``"role: 'x' is not one of ..."`` -> ``"role"`` (domain messages start with the field)."""
    head = str(exc).split(":", 1)[0]
    return head if head.replace("_", "").replace(".", "").isalnum() else "record"


class LocalAuditTransport:
    """The privacy service's own sink appends to its log directly (durable on return)."""

    def __init__(self, app: AuditApp) -> None:
        self._app = app

    def send(self, records: Sequence[AuditRecord]) -> None:
        self._app.append(records)

    def close(self) -> None:
        pass


def build_audit(settings, db: Database) -> tuple[AuditApp, AuditSink, list]:
    """Open the audit log on ``db`` (migrated), install the process's local audit sink,
    and return (app, sink, closers in the order they must run)."""
    app = AuditApp(db, load_signing_key(settings.audit_signing_key.get_secret_value(),
                                        settings.audit_signing_key_file, settings.data_dir),
                   thresholds=DetectorThresholds(bulk_readers=dict(settings.audit_bulk_readers)),
                   earlier_public_keys=load_previous_public_keys(settings.audit_previous_public_keys),
                   tree_head_history_s=settings.audit_tree_head_history_s)
    # No outbox (the log is local), but a reserve file: records held while the log's
    # database refuses writes (its disk full) survive a kill of this process.
    sink = AuditSink(LocalAuditTransport(app), component=SERVICE,
                     reserve=audit_client.reserve_for(settings.data_dir, SERVICE,
                                                      int(settings.audit_reserve_mb * 2**20)))
    audit_client.install(sink)
    if not app.writer.healthy_at_start:
        log.error("the audit log failed its start-up consistency check: call VerifyAudit")

    def close_sink() -> None:
        if audit_client.sink() is sink:
            audit_client.install(None)
        sink.close()

    return app, sink, [close_sink, app.close]
