"""python -m services.feedback: read config, wire dependencies, serve()."""

from __future__ import annotations

from hearth.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.common.consent import ConsentChecker
from services.common.erasure import data_holder
from services.common.server import run_service
from services.common.storage.cache import open_cache
from services.common.storage.sql import open_database
from services.feedback.app import FeedbackApp, FeedbackPolicy
from services.feedback.peers import ClusteringRefitClient, PrivacyFlagAuditor
from services.feedback.servicer import SERVICE_NAME, FeedbackServicer
from services.feedback.settings import FeedbackSettings, feedback_settings
from services.feedback.store import FeedbackStore

NAME = "feedback"


def policy_from(settings: FeedbackSettings) -> FeedbackPolicy:
    return FeedbackPolicy(thresholds=settings.thresholds(), trigger_cooldown_s=settings.feedback_trigger_cooldown_s,
                          recalibrate_min_new=settings.feedback_recalibrate_min_new,
                          label_window=settings.feedback_label_window,
                          experiment=settings.feedback_experiment, control=settings.feedback_control_variant,
                          variants=settings.variant_names())


def build(settings):
    settings = feedback_settings(settings)
    db = open_database(settings, NAME)
    store = FeedbackStore(db, open_cache(settings, NAME))
    store.migrate()
    refits = ClusteringRefitClient(settings.clustering_addr, settings.feedback_refit_timeout_s)
    auditor = PrivacyFlagAuditor(settings.privacy_addr, settings.feedback_audit_timeout_s)
    # Feedback on a prediction needs the account's processing consent (privacy's GetConsent,
    # cached a few seconds), as ingest and assignment do.
    consent = ConsentChecker.remote(settings.privacy_addr, NAME, timeout_s=settings.peer_timeout_s,
                                    ttl_s=settings.consent_cache_s)
    app = FeedbackApp(store, policy_from(settings), refits=refits, auditor=auditor, consent=consent,
                      retention_s=settings.retention_s)
    app.start_periodic(settings.feedback_check_interval_s)
    servicer = FeedbackServicer(app.intake, app.calibration, app.experiments)
    # Stop order: background work first (it uses the channels and the database).
    return ([(pb_grpc.add_FeedbackServiceServicer_to_server, servicer, SERVICE_NAME),
             data_holder(NAME, app.intake)],
            [app.close, refits.close, auditor.close, consent.close, db.close])


if __name__ == "__main__":
    run_service(NAME, build, FeedbackSettings)
