"""gRPC adapter of the feedback service."""

from __future__ import annotations

from hearth.feedback.v1 import feedback_pb2 as pb
from hearth.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.common.pbutil import ts_to_float
from services.feedback.app import FeedbackApp
from services.feedback.store import PredictionRecord

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeedbackService"].full_name


def prediction_from_pb(p: pb.Prediction, path: str) -> PredictionRecord:
    return PredictionRecord(p.prediction_id, p.account_id, p.session_id, p.person_id,
                            dict(p.probabilities), p.model_variant, p.model_version,
                            ts_to_float(p, "ts", f"{path}.ts"), p.cold_start, p.household_size)


class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    def __init__(self, app: FeedbackApp) -> None:
        self.app = app

    def RecordPrediction(self, request, context) -> pb.RecordPredictionResponse:
        items = [prediction_from_pb(p, f"predictions[{i}]") for i, p in enumerate(request.predictions)]
        accepted, duplicates = self.app.record_predictions(items)
        return pb.RecordPredictionResponse(accepted=accepted, duplicates=duplicates)
