"""python -m services.privacy: read config, build the four rooms (Deletion, Consent,
AuditLog, Keys), serve them from one process."""

from __future__ import annotations

from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.common.server import run_service
from services.common.storage.cache import erase_prefix, open_cache
from services.common.storage.sql import open_database
from services.privacy.consent.app import ConsentApp
from services.privacy.audit.app import build_audit
from services.privacy.deletion.app import PEER_SERVICES, DeletionCoordinator, GrpcPeers, retry_policy
from services.privacy.deletion.store import DeletionJobStore
from services.privacy.keys.store import DataKeyStore
from services.privacy.keys.app import KeyService, load_keks, load_signing_key
from services.privacy.keys.batch import BatchRotations, rotation_job_store
from services.privacy.keys.rotation import DataKeyRotation, max_calls_for
from services.privacy.settings import PrivacySettings, privacy_settings
from services.privacy.audit.servicer import SERVICE_NAME as AUDIT_LOG
from services.privacy.audit.servicer import AuditLogServicer
from services.privacy.consent.servicer import SERVICE_NAME as CONSENT
from services.privacy.consent.servicer import ConsentServicer
from services.privacy.deletion.servicer import SERVICE_NAME as DELETION
from services.privacy.deletion.servicer import DeletionServicer
from services.privacy.keys.servicer import SERVICE_NAME as KEYS
from services.privacy.keys.servicer import KeysServicer
from services.privacy.consent.store import ConsentStore

NAME = "privacy"


def build(settings):
    """The four rooms on one database, each servicer given what it uses."""
    settings = privacy_settings(settings)
    db = open_database(settings, NAME)
    store = ConsentStore(db, open_cache(settings, NAME))
    store.migrate()   # every room's tables: one schema history (migrations.py)
    consent = ConsentApp(store)
    # The audit log, and this process's audit sink appending to it locally.
    audit, _, audit_closers = build_audit(settings, db)
    # Deletion jobs, receipts, export and data keys; the worker resumes unfinished jobs.
    deletion, keys, peers = build_deletion(settings, db, store)
    deletion.start()
    # Data key rotation: re-encryption in every data-holding service (feedback seals
    # nothing, and answers 0), and a sweep that finishes rotations left by a crash.
    rotation = DataKeyRotation(keys, peers.rekey, PEER_SERVICES, settle_s=settings.dek_rotation_settle_s,
                               sweep_s=settings.dek_rotation_sweep_s, max_calls=max_calls_for(settings.max_workers))
    rotation.start()
    # Batch rotations as durable jobs (the deletion jobs' store over rotation_jobs): the
    # worker resumes a batch a crash cut, within a lease; households whose stores failed are
    # retried every sweep period.
    batches = BatchRotations(rotation_job_store(db), rotation, lease_s=settings.deletion_lease_s,
                             retry_s=settings.dek_rotation_sweep_s, poll_s=settings.deletion_poll_s)
    batches.start()
    return ([(pb_grpc.add_DeletionServicer_to_server, DeletionServicer(deletion, consent, keys), DELETION),
             (pb_grpc.add_ConsentServicer_to_server, ConsentServicer(consent), CONSENT),
             (pb_grpc.add_AuditLogServicer_to_server, AuditLogServicer(audit), AUDIT_LOG),
             (pb_grpc.add_KeysServicer_to_server, KeysServicer(keys, rotation, batches), KEYS)],
            [batches.close, rotation.close, deletion.close, peers.close, *audit_closers, db.close])


def build_deletion(settings, db, store):
    """Key service, peers and the deletion coordinator (worker not started)."""
    key_store = DataKeyStore(db)
    keks, active = load_keks(settings.keks, settings.active_kek, settings.data_dir,
                             stored_kek_ids=key_store.kek_ids_in_use())
    keys = KeyService(key_store, keks, active)
    peers = GrpcPeers({"clustering": settings.clustering_addr, "attribution": settings.attribution_addr,
                       "feedback": settings.feedback_addr}, settings.deletion_erase_timeout_s)
    deletion = DeletionCoordinator(
        DeletionJobStore(db), peers, keys, load_signing_key(settings.receipt_signing_key, settings.data_dir),
        policy=retry_policy(settings.deletion_retry_base_s, settings.deletion_retry_max_s,
                            settings.deletion_max_attempts),
        lease_s=settings.deletion_lease_s, erase_timeout_s=settings.deletion_erase_timeout_s,
        poll_s=settings.deletion_poll_s,
        retention_days=settings.retention_days, retention_check_s=settings.retention_check_s,
        on_local_erase=lambda scope: erase_prefix(store.cache, "" if scope.all_accounts else f"{scope.account_id}:"))
    return deletion, keys, peers


if __name__ == "__main__":
    run_service(NAME, build, PrivacySettings)
