"""Routes backed by the feedback service: feedback in, calibration and experiment out,
experiment flags (traffic split, kill switch) changed at run time, calibrator versions
listed and rolled back."""

from __future__ import annotations

import asyncio
import math
from datetime import datetime, timezone
from typing import Annotated, Literal

import grpc
from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from gateway import models
from gateway.errors import rpc_error_field
from gateway.routes import ID_PATTERN, api_router
from hearth.feedback.v1 import feedback_pb2 as fpb
from services.common.errors import Unavailable
from services.common.identity import Principal
from services.common.pbutil import float_to_ts
from services.common.text import MULTILINE_TEXT_PATTERN

Id = models.Id
Variant = Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]
VariantPath = Annotated[str, Path(min_length=1, max_length=64, pattern=ID_PATTERN)]
FeedbackKindName = Literal["explicit_confirm", "explicit_correct", "implicit_continue", "implicit_abandon",
                           "implicit_switch_profile"]
# services/feedback/calibration.GROUP_BY (tests/unit/test_documented_feedback.py holds them equal:
# until session 19 "calibration_group" was missing here, so HTTP refused what docs/feedback.md offers).
GroupBy = Literal["", "variant", "household_size", "cold_start", "model_age", "calibration_group"]

CALIBRATOR_NOT_FOUND = {404: {"model": models.ErrorOut, "description": "unknown variant, or no such calibrator version"}}
PREDICTION_NOT_FOUND = {404: {"model": models.ErrorOut,
                              "description": "unknown prediction, still unknown after HEARTH_FEEDBACK_PREDICTION_WAIT_S"},
                        503: {"model": models.ErrorOut,
                              "description": "a service is unavailable; also an unknown prediction while clustering "
                                             "(which forwards predictions) is down: retry after Retry-After"}}
CONFLICT = {409: {"model": models.ErrorOut, "description": "feedback_id already used for another feedback, "
                                                           "or a concurrent flag change"}}


class FeedbackIn(models.Strict):
    feedback_id: Id = Field(description="idempotency key: a repeat is answered with duplicate=true")
    prediction_id: Id
    kind: FeedbackKindName = Field(description="explicit_confirm: the predicted person was watching; "
                                               "explicit_correct / implicit_switch_profile: it was true_person_id; "
                                               "implicit_continue / implicit_abandon: kept watching / quickly "
                                               "abandoned a title recommended to the predicted person")
    true_person_id: Id | None = Field(None, description="required for explicit_correct and "
                                                        "implicit_switch_profile")
    ts: models.Timestamp | None = Field(None, description="when it happened (default: now); RFC 3339, "
                                                          "2000-01-01 to 10 minutes from now")
    unprompted: bool = Field(False, description="the user volunteered it (a 'not me' button) rather than answering a "
                                                "prompt shown whether or not the answer was right: it names the person "
                                                "but stays out of calibration (docs/feedback.md)")


class FeedbackOut(BaseModel):
    duplicate: bool
    weight: float = Field(description="evidence weight of this kind of signal (docs/feedback.md)")


class ReliabilityBinOut(BaseModel):
    lower: float
    upper: float
    count: int
    mean_confidence: float
    accuracy: float


class CalibrationGroupOut(BaseModel):
    group: str = Field(description="group name; `calibrated:<group>` after the current calibrators")
    n: int
    brier: float
    log_loss: float | None = Field(description="null when no feedback in the group names the true person")
    ece: float
    ece_equal_mass: float
    bins: list[ReliabilityBinOut]


class CalibrationOut(BaseModel):
    groups: list[CalibrationGroupOut]
    calibrator_version: str = Field(description="`<variant>:<version>,...` of the calibrators in force")


class VariantResultOut(BaseModel):
    variant: str
    n: int
    accuracy: float
    brier: float


class ExperimentOut(BaseModel):
    variant: str | None = Field(description="the account's variant (null without account_id)")
    traffic: dict[str, float] = Field(description="configured percentages, control included")
    kill_switch: bool
    results: list[VariantResultOut]
    p_value: float | None = Field(description="accuracy z-test, treatment vs control; null when not computable")


class FlagsIn(models.Strict):
    traffic: dict[Variant, Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=dict, max_length=16,
        description="full split including control, summing to 100; empty keeps the current split")
    kill_switch: bool = Field(description="true sends every household to the control variant")
    reason: str = Field(min_length=1, max_length=500, pattern=MULTILINE_TEXT_PATTERN,
                        description="why (kept in the audit trail)")


class FlagsOut(BaseModel):
    version: int


class CalibratorVersionOut(BaseModel):
    version: int
    method: str = Field(description="identity | temperature | isotonic")
    fitted_at: datetime
    n: int = Field(description="feedback rows it was fitted on")


class CalibratorsOut(BaseModel):
    variant: str
    current_version: int = Field(description="the version clustering applies; 0 = none (identity)")
    held: bool = Field(description="automatic refits leave this variant alone (after a rollback)")
    versions: list[CalibratorVersionOut] = Field(description="every stored version, newest first")
    choice_version: int = Field(description="version of the last change made through PUT (0: none)")
    reason: str = Field(description="that change's reason")


class CalibratorChoiceIn(models.Strict):
    version: int = Field(ge=0, le=2**63 - 1, description="a stored version to put in force (roll back or forward); "
                                           "0 = none, the raw model confidences")
    hold: bool = Field(True, description="keep it: automatic refits skip the variant until a change with "
                                         "hold=false releases it")
    reason: str = Field(min_length=1, max_length=500, pattern=MULTILINE_TEXT_PATTERN,
                        description="why (kept in the audit trail)")


class CalibratorChoiceOut(BaseModel):
    variant: str
    version: int
    previous_version: int
    choice_version: int


def _nullable(value: float) -> float | None:
    return None if math.isnan(value) else value


class PredictionWait:
    """POST /v1/feedback on a prediction the feedback service does not know yet: retried for
    at most ``wait_s``. Clustering logs a prediction durably before it answers and forwards
    it to feedback a moment later, so feedback given at once on an id the mesh has just
    handed out would be refused as unknown; an id still unknown after the wait gets the 404
    (field ``prediction_id``). Other errors are not retried.

    At most ``max_waiting`` requests wait at once; past that the 404 is answered at once. A
    waiting request holds one of the gateway's admission slots for the feedback service
    (HEARTH_ADMISSION_*, 32 by default), so a burst of unknown ids must not starve real
    feedback of them.

    An id still unknown after the wait while clustering is not serving is a 503 with
    Retry-After, not a 404: clustering's outbox is durable and its forwarder sends what is
    left in it when the process starts again (services/clustering/prediction_log.py), so a
    prediction handed out just before clustering stopped reaches feedback once clustering
    is back — the 404 would be wrong, and final to a client that believes it."""

    def __init__(self, wait_s: float, max_waiting: int = 8) -> None:
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self.waiting = 0

    async def record(self, clients, request: fpb.RecordFeedbackRequest, who: Principal):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        delay = 0.05
        holds_slot = False
        try:
            while True:
                try:
                    return await clients.call("feedback", "RecordFeedback", request, who)
                except grpc.aio.AioRpcError as exc:
                    unknown_prediction = (exc.code() == grpc.StatusCode.NOT_FOUND
                                          and rpc_error_field(exc) == "prediction_id")
                    if not unknown_prediction:
                        raise
                    if loop.time() + delay > deadline:
                        if not await clients.serving("clustering"):
                            raise Unavailable("the prediction is not known yet and clustering, which forwards "
                                              "predictions, is unavailable; retry after Retry-After seconds",
                                              "prediction_id") from None
                        raise
                    if not holds_slot:
                        if self.waiting >= self.max_waiting:
                            raise
                        self.waiting += 1
                        holds_slot = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.4)
        finally:
            if holds_slot:
                self.waiting -= 1


def router(clients, access, prediction_wait_s: float = 2.0) -> APIRouter:
    api = api_router()
    prediction_wait = PredictionWait(prediction_wait_s)

    @api.post("/v1/feedback", response_model=FeedbackOut,
              responses={**PREDICTION_NOT_FOUND, **CONFLICT},
              summary="Explicit or implicit feedback on a prediction (idempotent by feedback_id)")
    async def post_feedback(body: FeedbackIn, who: Principal = Depends(access("POST /v1/feedback"))):
        request = fpb.RecordFeedbackRequest(
            feedback_id=body.feedback_id, prediction_id=body.prediction_id,
            kind=fpb.FeedbackKind.Value("FEEDBACK_KIND_" + body.kind.upper()),
            true_person_id=body.true_person_id or "", unprompted=body.unprompted)
        if body.ts is not None:
            request.ts.CopyFrom(float_to_ts(body.ts.timestamp()))
        r = await prediction_wait.record(clients, request, who)
        return FeedbackOut(duplicate=r.duplicate, weight=r.weight)

    @api.get("/v1/calibration", response_model=CalibrationOut,
             summary="Brier, log loss, ECE and reliability bins, overall or by group, before and after "
                     "recalibration")
    async def get_calibration(group_by: GroupBy = Query(""), bins: int = Query(10, ge=1, le=100),
                              who: Principal = Depends(access("GET /v1/calibration"))):
        r = await clients.call("feedback", "GetCalibration",
                               fpb.GetCalibrationRequest(group_by=group_by, bins=bins), who)
        return CalibrationOut(calibrator_version=r.calibrator_version, groups=[
            CalibrationGroupOut(group=g.group, n=g.n, brier=g.brier, log_loss=_nullable(g.log_loss), ece=g.ece,
                                ece_equal_mass=g.ece_equal_mass,
                                bins=[ReliabilityBinOut(lower=b.lower, upper=b.upper, count=b.count,
                                                        mean_confidence=b.mean_confidence, accuracy=b.accuracy)
                                      for b in g.bins]) for g in r.groups])

    @api.get("/v1/experiment", response_model=ExperimentOut,
             summary="Variant of a household, traffic split, kill switch and per-variant results")
    async def get_experiment(account_id: models.Id | None = Query(None),
                             who: Principal = Depends(access("GET /v1/experiment"))):
        r = await clients.call("feedback", "GetExperiment",
                               fpb.GetExperimentRequest(account_id=account_id or ""), who)
        return ExperimentOut(variant=r.variant or None, traffic=dict(r.traffic), kill_switch=r.kill_switch,
                             results=[VariantResultOut(variant=v.variant, n=v.n, accuracy=v.accuracy, brier=v.brier)
                                      for v in r.results], p_value=_nullable(r.p_value))

    @api.put("/v1/experiment", response_model=FlagsOut, responses={**CONFLICT},
             summary="Change the traffic split or the kill switch at run time (versioned, audited)")
    async def put_experiment(body: FlagsIn, who: Principal = Depends(access("PUT /v1/experiment"))):
        r = await clients.call("feedback", "SetFlag", fpb.SetFlagRequest(
            traffic=body.traffic, kill_switch=body.kill_switch, reason=body.reason), who)
        return FlagsOut(version=r.version)

    @api.get("/v1/calibrators/{variant}", response_model=CalibratorsOut, responses={**CALIBRATOR_NOT_FOUND},
             summary="Every stored calibrator version of a variant, the one in force, and whether refits are held")
    async def get_calibrators(variant: VariantPath, who: Principal = Depends(access("GET /v1/calibrators/{variant}"))):
        r = await clients.call("feedback", "ListCalibrators", fpb.ListCalibratorsRequest(variant=variant), who)
        return CalibratorsOut(variant=r.variant, current_version=r.current_version, held=r.held,
                              choice_version=r.choice_version, reason=r.reason, versions=[
                                  CalibratorVersionOut(version=v.version, method=v.method, n=v.n,
                                                       fitted_at=v.fitted_at.ToDatetime(tzinfo=timezone.utc))
                                  for v in r.versions])

    @api.put("/v1/calibrators/{variant}", response_model=CalibratorChoiceOut,
             responses={**CALIBRATOR_NOT_FOUND, **CONFLICT},
             summary="Put a stored calibrator version in force (roll back), hold or release refits (audited)")
    async def put_calibrator(variant: VariantPath, body: CalibratorChoiceIn,
                             who: Principal = Depends(access("PUT /v1/calibrators/{variant}"))):
        r = await clients.call("feedback", "ActivateCalibrator", fpb.ActivateCalibratorRequest(
            variant=variant, version=body.version, hold=body.hold, reason=body.reason), who)
        return CalibratorChoiceOut(variant=r.variant, version=r.version, previous_version=r.previous_version,
                                   choice_version=r.choice_version)

    return api
