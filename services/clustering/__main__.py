"""python -m services.clustering: read config, wire dependencies, serve()."""

from __future__ import annotations

import logging
import threading
import time

from hearth.clustering.v1 import clustering_pb2_grpc as pb_grpc
from services.clustering.app import ClusteringApp
from services.clustering.domain.features import GenreVocabulary
from services.clustering.modeling import ModelKeeper
from services.clustering.peers import FeedbackPeer
from services.clustering.prediction_log import PredictionLog
from services.clustering.servicer import SERVICE_NAME, ClusteringServicer
from services.clustering.store import ClusteringStore
from services.common.config import ConfigError
from services.common.consent import ConsentChecker
from services.common.erasure import data_holder
from services.common.failure_log import FailureLog
from services.common.field_crypto import FieldCipher
from services.common.server import run_service
from services.clustering.settings import ClusteringSettings, clustering_settings
from services.common.storage.cache import open_cache
from services.common.storage.sql import open_database

NAME = "clustering"
log = logging.getLogger("hearth.clustering")


# The prior rebuild reads every stored household's sessions (decrypting them), which on
# a restart under traffic competed with serving: the restarted service took 112 s to serve
# its traffic again (docs/benchmarks.md). So the service serves (SERVING) from the start,
# cold-start households use the account-level fallback until the prior exists, and the
# rebuild is paced to at most this share of the process's time (it sleeps after each
# household's read in proportion to what the read took).
PRIOR_REBUILD_DUTY_CYCLE = 0.25


def _keep_population_prior_fresh(app: ClusteringApp, interval_s: float, stop: threading.Event) -> None:
    """Learn the persona mixture used by the population cold-start strategy from the
    households already stored, at start and then every ``interval_s``, throttled to
    PRIOR_REBUILD_DUTY_CYCLE; a stop (shutdown) ends a rebuild in progress quickly."""
    def pace(spent_s: float) -> None:
        if stop.wait(spent_s * (1.0 / PRIOR_REBUILD_DUTY_CYCLE - 1.0)):
            raise _Stopped

    failures = FailureLog(log, "population prior build")
    while True:
        try:
            started = time.monotonic()
            prior = app.build_population_prior(pace=pace)
            if prior is not None:
                app.set_population_prior(prior)
            log.info("population prior %s in %.1f s (paced)", "rebuilt" if prior else "not built (too few households)",
                     time.monotonic() - started)
        except _Stopped:
            return
        except Exception:  # noqa: BLE001 - cold start falls back to account level meanwhile
            failures.failed()
        else:
            failures.succeeded()
        if stop.wait(interval_s):
            return


class _Stopped(Exception):
    """The service is stopping: abandon the prior rebuild."""


def build(settings):
    settings = clustering_settings(settings)
    db = open_database(settings, NAME)
    # Sensitive fields encrypted with the household's data key from privacy (GetDataKey);
    # consent checked with privacy's GetConsent (cached a few seconds).
    cipher = FieldCipher.remote(settings.privacy_addr, NAME, timeout_s=settings.peer_timeout_s)
    consent = ConsentChecker.remote(settings.privacy_addr, NAME, timeout_s=settings.peer_timeout_s,
                                    ttl_s=settings.consent_cache_s)
    try:
        vocabulary = GenreVocabulary.parse(settings.genre_aliases,
                                           unknown="other" if settings.unknown_genres == "other" else "hash")
    except ValueError as exc:
        raise ConfigError(f"invalid configuration:\n  HEARTH_GENRE_ALIASES: {exc}") from None
    store = ClusteringStore(db, open_cache(settings, NAME), gap_s=settings.session_gap_s,
                            lateness_tolerance_s=settings.lateness_tolerance_s, cipher=cipher,
                            vocabulary=vocabulary, retention_s=settings.retention_s,
                            max_devices_per_household=settings.max_devices_per_household)
    store.migrate()
    feedback = FeedbackPeer(settings.feedback_addr, timeout_s=settings.peer_timeout_s,
                            calibrator_cache_s=settings.calibrator_cache_s)
    predictions = PredictionLog(db, feedback.record_predictions, session_writer=store.write_persons,
                                forward_interval_s=settings.prediction_forward_interval_s,
                                retention_s=settings.retention_s)
    keeper = ModelKeeper(store, feedback.variant_of, cold_start=settings.cold_start,
                         gmm_fault_prefix=settings.fault_gmm_numerical)
    app = ClusteringApp(store, consent, keeper=keeper, predictions=predictions,
                        calibrator_of=feedback.calibrator, unknown_genres=settings.unknown_genres,
                        erasure_fence_s=settings.erasure_fence_s, warm_variants=feedback.warm_variants)
    stop = threading.Event()
    if settings.cold_start == "population_prior":
        threading.Thread(target=_keep_population_prior_fresh, name="population-prior", daemon=True,
                         args=(app, settings.population_prior_refresh_s, stop)).start()
    servicer = ClusteringServicer(app)
    return ([(pb_grpc.add_ClusteringServiceServicer_to_server, servicer, SERVICE_NAME),
             data_holder(NAME, app)],
            [stop.set, app.close, feedback.close, consent.close, cipher.close, db.close])


if __name__ == "__main__":
    run_service(NAME, build, ClusteringSettings)
