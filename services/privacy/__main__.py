"""python -m services.privacy: read config, wire dependencies, serve()."""

from __future__ import annotations

from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.common.server import run_service
from services.common.storage.cache import open_cache
from services.common.storage.sql import open_database
from services.privacy.consent.app import PrivacyApp
from services.privacy.audit.app import build_audit
from services.privacy.deletion.app import DeletionCoordinator, GrpcPeers, retry_policy
from services.privacy.deletion.store import DeletionJobStore
from services.privacy.keys.store import DataKeyStore
from services.privacy.keys.app import KeyService, load_keks, load_signing_key
from services.privacy.settings import privacy_settings
from services.privacy.consent.servicer import SERVICE_NAME, PrivacyServicer
from services.privacy.consent.store import PrivacyStore

NAME = "privacy"


def build(settings):
    db = open_database(settings, NAME)
    store = PrivacyStore(db, open_cache(settings, NAME))
    store.migrate()
    servicer = PrivacyServicer(PrivacyApp(store))
    # The audit log, and this process's audit sink appending to it locally.
    servicer.audit, _, audit_closers = build_audit(settings, db)
    # Deletion jobs, receipts, export and data keys; the worker resumes unfinished jobs.
    servicer.deletion, servicer.keys, peers = build_deletion(privacy_settings(settings), db, store)
    servicer.deletion.start()
    return ([(pb_grpc.add_PrivacyServiceServicer_to_server, servicer, SERVICE_NAME)],
            [servicer.deletion.close, peers.close, *audit_closers, db.close])


def build_deletion(settings, db, store):
    """Key service, peers and the deletion coordinator (worker not started)."""
    keks, active = load_keks(settings.keks, settings.active_kek, settings.data_dir)
    keys = KeyService(DataKeyStore(db), keks, active)
    peers = GrpcPeers({"clustering": settings.clustering_addr, "attribution": settings.attribution_addr,
                       "feedback": settings.feedback_addr}, settings.deletion_erase_timeout_s)
    deletion = DeletionCoordinator(
        DeletionJobStore(db), peers, keys, load_signing_key(settings.receipt_signing_key, settings.data_dir),
        policy=retry_policy(settings.deletion_retry_base_s, settings.deletion_retry_max_s,
                            settings.deletion_max_attempts),
        lease_s=settings.deletion_lease_s, poll_s=settings.deletion_poll_s,
        retention_days=settings.retention_days, retention_check_s=settings.retention_check_s,
        on_local_erase=lambda scope: store.cache.delete_prefix(
            "" if scope.all_accounts else f"{scope.account_id}:"))
    return deletion, keys, peers


if __name__ == "__main__":
    run_service(NAME, build)
