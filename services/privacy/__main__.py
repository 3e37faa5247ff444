"""python -m services.privacy: read config, wire dependencies, serve()."""

from __future__ import annotations

from hearth.privacy.v1 import privacy_pb2_grpc as pb_grpc
from services.common.server import run_service
from services.common.storage.cache import open_cache
from services.common.storage.sql import open_database
from services.privacy.app import PrivacyApp
from services.privacy.servicer import SERVICE_NAME, PrivacyServicer
from services.privacy.store import PrivacyStore

NAME = "privacy"


def build(settings):
    db = open_database(settings, NAME)
    store = PrivacyStore(db, open_cache(settings, NAME))
    store.migrate()
    servicer = PrivacyServicer(PrivacyApp(store))
    return [(pb_grpc.add_PrivacyServiceServicer_to_server, servicer, SERVICE_NAME)], [db.close]


if __name__ == "__main__":
    run_service(NAME, build)
