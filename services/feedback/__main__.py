"""python -m services.feedback: read config, wire dependencies, serve()."""

from __future__ import annotations

from hearth.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.common.server import run_service
from services.common.storage.cache import open_cache
from services.common.storage.sql import open_database
from services.feedback.app import FeedbackApp
from services.feedback.servicer import SERVICE_NAME, FeedbackServicer
from services.feedback.store import FeedbackStore

NAME = "feedback"


def build(settings):
    db = open_database(settings, NAME)
    store = FeedbackStore(db, open_cache(settings, NAME))
    store.migrate()
    servicer = FeedbackServicer(FeedbackApp(store))
    return [(pb_grpc.add_FeedbackServiceServicer_to_server, servicer, SERVICE_NAME)], [db.close]


if __name__ == "__main__":
    run_service(NAME, build)
