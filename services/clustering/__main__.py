"""python -m services.clustering: read config, wire dependencies, serve()."""

from __future__ import annotations

from hearth.clustering.v1 import clustering_pb2_grpc as pb_grpc
from services.clustering.app import ClusteringApp
from services.clustering.servicer import SERVICE_NAME, ClusteringServicer
from services.clustering.store import ClusteringStore
from services.common.consent import ConsentChecker
from services.common.field_crypto import FieldCipher
from services.common.server import run_service
from services.common.storage.cache import open_cache
from services.common.storage.sql import open_database

NAME = "clustering"


def build(settings):
    db = open_database(settings, NAME)
    # Sensitive fields encrypted with the household's data key from privacy (GetDataKey);
    # consent checked with privacy's GetConsent (cached a few seconds).
    cipher = FieldCipher.remote(settings.privacy_addr, NAME, timeout_s=settings.peer_timeout_s)
    consent = ConsentChecker.remote(settings.privacy_addr, NAME, timeout_s=settings.peer_timeout_s)
    store = ClusteringStore(db, open_cache(settings, NAME), gap_s=settings.session_gap_s,
                            lateness_tolerance_s=settings.lateness_tolerance_s, cipher=cipher)
    store.migrate()
    servicer = ClusteringServicer(ClusteringApp(store, consent))
    return ([(pb_grpc.add_ClusteringServiceServicer_to_server, servicer, SERVICE_NAME)],
            [consent.close, cipher.close, db.close])


if __name__ == "__main__":
    run_service(NAME, build)
