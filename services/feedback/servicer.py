"""gRPC adapter of the feedback service: validate -> pb to domain -> one use case -> pb."""

from __future__ import annotations

import math

from hearth.feedback.v1 import feedback_pb2 as pb
from hearth.feedback.v1 import feedback_pb2_grpc as pb_grpc
from services.common import identity
from services.common.errors import InvalidArgument
from services.common.pbutil import float_to_ts, ts_to_float
from services.feedback.calibration import Calibration
from services.feedback.experiments import Experiments
from services.feedback.intake import Intake
from services.feedback.domain.signals import SignalKind
from services.feedback.store import PredictionRecord

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeedbackService"].full_name

# The proto's feedback kinds and the domain's signal kinds (docs/feedback.md has the weights).
KIND_BY_PB: dict[int, SignalKind] = {
    pb.FEEDBACK_KIND_EXPLICIT_CONFIRM: SignalKind.PROFILE_CONFIRMED,
    pb.FEEDBACK_KIND_EXPLICIT_CORRECT: SignalKind.PROFILE_CORRECTED,
    pb.FEEDBACK_KIND_IMPLICIT_SWITCH_PROFILE: SignalKind.PROFILE_SWITCHED,
    pb.FEEDBACK_KIND_IMPLICIT_CONTINUE: SignalKind.CONTINUED_RECOMMENDATION,
    pb.FEEDBACK_KIND_IMPLICIT_ABANDON: SignalKind.ABANDONED_QUICKLY,
}


def prediction_from_pb(p: pb.Prediction, path: str) -> PredictionRecord:
    return PredictionRecord(p.prediction_id, p.account_id, p.session_id, p.person_id,
                            dict(p.probabilities), p.model_variant, p.model_version,
                            ts_to_float(p, "ts", f"{path}.ts"), p.cold_start, p.household_size, p.device_id,
                            ts_to_float(p, "session_start", f"{path}.session_start", required=False),
                            ts_to_float(p, "session_end", f"{path}.session_end", required=False),
                            p.model_sessions, p.calibration_group)


def _finite_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    """One RPC, one room: intake (RecordPrediction, RecordFeedback), calibration
    (GetCalibrator, GetCalibration, ListCalibrators, ActivateCalibrator), experiments
    (GetExperiment, GetVariants, SetFlag)."""

    def __init__(self, intake: Intake, calibration: Calibration, experiments: Experiments) -> None:
        self.intake = intake
        self.calibration = calibration
        self.experiments = experiments

    def RecordPrediction(self, request, context) -> pb.RecordPredictionResponse:
        items = [prediction_from_pb(p, f"predictions[{i}]") for i, p in enumerate(request.predictions)]
        accepted, duplicates = self.intake.record_predictions(items)
        return pb.RecordPredictionResponse(accepted=accepted, duplicates=duplicates)

    def RecordFeedback(self, request, context) -> pb.RecordFeedbackResponse:
        kind = KIND_BY_PB.get(request.kind)
        if kind is None:
            problem = "is required" if request.kind == 0 else f"unknown value {request.kind}"   # was "is required" for both
            raise InvalidArgument(f"{problem}: one of EXPLICIT_CONFIRM, EXPLICIT_CORRECT, IMPLICIT_CONTINUE, "
                                  "IMPLICIT_ABANDON, IMPLICIT_SWITCH_PROFILE", "kind")
        duplicate, weight = self.intake.record_feedback(
            request.feedback_id, request.prediction_id, kind, request.true_person_id or None,
            ts_to_float(request, "ts", "ts", required=False), request.unprompted)
        return pb.RecordFeedbackResponse(duplicate=duplicate, weight=weight)

    def GetCalibrator(self, request, context) -> pb.GetCalibratorResponse:
        version, calibrator = self.calibration.calibrator_for(request.variant)
        return pb.GetCalibratorResponse(variant=request.variant, version=version, method=calibrator.method,
                                        calibrator_json=calibrator.to_json())

    def GetCalibration(self, request, context) -> pb.GetCalibrationResponse:
        report = self.calibration.report(request.group_by, request.bins)
        return pb.GetCalibrationResponse(
            calibrator_version=report.calibrator_version,
            groups=[pb.CalibrationGroup(
                group=g.group, n=g.summary.n, brier=g.summary.brier, log_loss=_finite_or_nan(g.summary.log_loss),
                ece=g.summary.ece, ece_equal_mass=g.summary.ece_equal_mass,
                bins=[pb.ReliabilityBin(lower=b["lower"], upper=b["upper"], count=b["count"],
                                        mean_confidence=b["mean_confidence"], accuracy=b["accuracy"])
                      for b in g.bins]) for g in report.groups])

    def GetExperiment(self, request, context) -> pb.GetExperimentResponse:
        view = self.experiments.experiment(request.account_id)
        return pb.GetExperimentResponse(
            variant=view.variant, traffic=view.traffic, kill_switch=view.kill_switch, p_value=view.p_value,
            results=[pb.VariantResult(variant=r.variant, n=r.n, accuracy=r.accuracy, brier=r.brier)
                     for r in view.results])

    def GetVariants(self, request, context) -> pb.GetVariantsResponse:
        return pb.GetVariantsResponse(variants=self.experiments.variants(list(request.account_ids)))

    def SetFlag(self, request, context) -> pb.SetFlagResponse:
        version = self.experiments.set_flags(dict(request.traffic), request.kill_switch, request.reason,
                                             identity.current_principal())
        return pb.SetFlagResponse(version=version)

    def ListCalibrators(self, request, context) -> pb.ListCalibratorsResponse:
        h = self.calibration.choices.history(request.variant)
        return pb.ListCalibratorsResponse(
            variant=h.variant, current_version=h.current_version, held=h.held, choice_version=h.choice_version,
            reason=h.reason, versions=[pb.CalibratorVersion(version=v.version, method=v.method, n=v.n,
                                                            fitted_at=float_to_ts(v.fitted_at))
                                       for v in h.versions])

    def ActivateCalibrator(self, request, context) -> pb.ActivateCalibratorResponse:
        c = self.calibration.choices.activate(request.variant, request.version, request.hold, request.reason,
                                              identity.current_principal())
        return pb.ActivateCalibratorResponse(variant=c.variant, version=c.version,
                                             previous_version=c.previous_version, choice_version=c.choice_version)
