"""python -m services.attribution: read config, wire dependencies, serve()."""

from __future__ import annotations

from hearth.attribution.v1 import attribution_pb2_grpc as pb_grpc
from services.attribution.app import AttributionApp
from services.attribution.resolver import ClusteringResolver
from services.attribution.servicer import SERVICE_NAME, AttributionServicer
from services.attribution.store import AttributionStore
from services.common.consent import ConsentChecker
from services.common.erasure import data_holder
from services.common.field_crypto import FieldCipher
from services.common.server import run_service
from services.attribution.settings import AttributionSettings, attribution_settings
from services.common.storage.cache import open_cache
from services.common.storage.sql import open_database

NAME = "attribution"


def build(settings):
    settings = attribution_settings(settings)
    db = open_database(settings, NAME)
    # Sensitive columns encrypted with the household's data key from privacy (GetDataKey).
    cipher = FieldCipher.remote(settings.privacy_addr, NAME, timeout_s=settings.peer_timeout_s)
    consent = ConsentChecker.remote(settings.privacy_addr, NAME, timeout_s=settings.peer_timeout_s,
                                    ttl_s=settings.consent_cache_s)
    store = AttributionStore(db, open_cache(settings, NAME), cipher=cipher)
    store.migrate()
    resolver = ClusteringResolver(settings.clustering_addr, settings.peer_timeout_s)
    app = AttributionApp(store, resolver, consent, retention_s=settings.retention_s)
    servicer = AttributionServicer(app)
    return ([(pb_grpc.add_AttributionServiceServicer_to_server, servicer, SERVICE_NAME),
             data_holder(NAME, app)],
            [resolver.close, consent.close, cipher.close, db.close])


if __name__ == "__main__":
    run_service(NAME, build, AttributionSettings)
