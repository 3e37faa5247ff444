"""Routes backed by the clustering service: events in, households out, assignment."""

from __future__ import annotations

import math
from datetime import timezone

import grpc
import numpy as np
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field, model_validator

from gateway import models
from gateway.errors import rpc_error_field
from gateway.routes import ACCOUNT_PATH, api_router
from hearth.clustering.v1 import clustering_pb2 as cpb
from services.clustering.domain import features as F
from services.common.errors import InvalidArgument
from services.common.identity import Principal
from services.common.pbutil import float_to_ts, name_to_enum
from services.common.text import TEXT_PATTERN



def _ts_seconds(dt) -> float:
    return dt.timestamp()


def _event_to_pb(e: models.EventIn) -> cpb.ViewingEvent:
    msg = cpb.ViewingEvent(
        event_id=e.event_id, account_id=e.account_id, device_id=e.device_id,
        device_type=name_to_enum(e.device_type, cpb.DeviceType.DESCRIPTOR, "DEVICE_TYPE_"),
        ts=float_to_ts(_ts_seconds(e.ts)),
        kind=name_to_enum(e.kind, cpb.EventKind.DESCRIPTOR, "EVENT_KIND_"),
        title_id=e.title_id or "", genres=e.genres, duration_s=e.duration_s, vpn=e.vpn,
        maturity=name_to_enum(e.maturity, cpb.Maturity.DESCRIPTOR, "MATURITY_") if e.maturity else 0)
    if e.series_id is not None:
        msg.series_id = e.series_id
    if e.country is not None:
        msg.country = e.country
    if e.profile_hint is not None:
        msg.profile_hint = e.profile_hint
    if e.utc_offset_minutes is not None:
        msg.utc_offset_minutes = e.utc_offset_minutes
    return msg


def _device_name(value: int) -> str:
    return cpb.DeviceType.Name(value).removeprefix("DEVICE_TYPE_").lower()


def _household_to_json(r: cpb.GetHouseholdResponse) -> models.HouseholdOut:
    def dt(ts):
        return ts.ToDatetime(tzinfo=timezone.utc)

    return models.HouseholdOut(
        account_id=r.account_id,
        devices=[models.DeviceOut(device_id=d.device_id, device_type=_device_name(d.device_type),
                                  session_count=d.session_count, last_seen=dt(d.last_seen))
                 for d in r.devices],
        sessions=[models.SessionOut(
            session_id=s.session_id, device_id=s.device_id, start=dt(s.start), end=dt(s.end),
            event_count=s.event_count, watch_seconds=s.watch_seconds, closed=s.closed,
            feature_schema_version=s.feature_schema_version,
            feature_vector=(np.frombuffer(s.feature_vector, dtype="<f4").round(6).tolist()
                            if s.feature_vector else None),
            person_id=s.person_id or None,
            person_probability=s.person_probability if s.person_id else None,
            zero_watch=s.zero_watch) for s in r.sessions],
        persons=[models.PersonOut(person_id=p.person_id, session_count=p.session_count,
                                  peak_hours=list(p.peak_hours), peak_days=list(p.peak_days),
                                  devices=list(p.devices), top_genres=list(p.top_genres),
                                  kids_share=p.kids_share) for p in r.persons],
        drift_events=[models.DriftOut(drift_type=d.drift_type, severity=d.severity, statistic=d.statistic,
                                      detected_at=dt(d.detected_at), refit_triggered=d.refit_triggered)
                      for d in r.drift_events],
        model_version=r.model_version, model_variant=r.model_variant,
        next_cursor=r.next_page_token or None, truncated=r.truncated, total_sessions=r.total_sessions,
        total_devices=r.total_devices,
        status=models.ModelStatusOut(
            model_version=r.status.model_version, sessions_in_model=r.status.sessions_in_model,
            sessions_pending=r.status.sessions_pending,
            last_refit=dt(r.status.last_refit) if r.status.HasField("last_refit") else None,
            persons=r.status.persons, settled=r.status.settled,
            unknown_genres={g.genre: g.events for g in r.status.unknown_genres}))


class AssignIn(models.Strict):
    account_id: models.Id
    session_id: models.Id | None = Field(None, description="a stored session; or give feature_vector")
    feature_vector: list[float] | None = Field(None, min_length=F.FEATURE_DIM, max_length=F.FEATURE_DIM,
                                               description=f"schema v{F.FEATURE_SCHEMA_VERSION} (docs/features.md)")

    @model_validator(mode="after")
    def _one_of(self) -> "AssignIn":
        if (self.session_id is None) == (self.feature_vector is None):
            raise ValueError("give exactly one of session_id or feature_vector")
        return self


class PersonProbabilityOut(BaseModel):
    person_id: str
    probability: float


class AssignOut(BaseModel):
    person_id: str
    confidence: float
    probabilities: list[PersonProbabilityOut]
    model_variant: str
    model_version: int
    cold_start: str | None = Field(None, description="strategy that answered while the household has < 10 sessions")
    sessions_until_full_model: int
    prediction_id: str


FLOAT32_MAX = float(np.finfo(np.float32).max)

_COLD_NAMES = {cpb.COLD_START_STRATEGY_ACCOUNT: "account", cpb.COLD_START_STRATEGY_POPULATION_PRIOR: "population_prior",
               cpb.COLD_START_STRATEGY_HEURISTIC: "heuristic"}


def router(clients, access) -> APIRouter:
    api = api_router()

    @api.post("/v1/events", response_model=models.IngestOut,
              summary="Ingest a batch of viewing events (idempotent by event_id)")
    async def post_events(body: models.EventsIn, who: Principal = Depends(access("POST /v1/events"))):
        request = cpb.IngestEventsRequest(events=[_event_to_pb(e) for e in body.events])
        r = await clients.stream_unary("clustering", "IngestEvents", [request], who)
        return models.IngestOut(accepted=r.accepted, duplicates=r.duplicates,
                                rejected_late=r.rejected_late, sessions_touched=r.sessions_touched,
                                rejected_expired=r.rejected_expired)

    @api.post("/v1/events/status", response_model=models.EventStatusOut,
              summary="Which of a household's event ids are stored (ask after a POST /v1/events got no answer)")
    async def post_events_status(body: models.EventStatusIn,
                                 who: Principal = Depends(access("POST /v1/events/status"))):
        r = await clients.call("clustering", "GetEventStatus",
                               cpb.GetEventStatusRequest(account_id=body.account_id, event_ids=body.event_ids), who)
        return models.EventStatusOut(account_id=body.account_id, stored=list(r.stored), erased=list(r.erased),
                                     not_stored=list(r.not_stored))

    @api.get("/v1/household/{account_id}", response_model=models.HouseholdOut,
             responses={404: {"model": models.ErrorOut, "description": "unknown account"}},
             summary="Devices, sessions, persons and drift events of a household")
    async def get_household(account_id: str = ACCOUNT_PATH,
                            limit: int = Query(500, ge=1, le=10_000, description="sessions per page"),
                            cursor: str = Query("", max_length=512, pattern=TEXT_PATTERN,
                                               description="next_cursor of the previous page"),
                            who: Principal = Depends(access("GET /v1/household/{account_id}"))):
        try:
            r = await clients.call("clustering", "GetHousehold",
                                   cpb.GetHouseholdRequest(account_id=account_id, max_sessions=limit, page_token=cursor),
                                   who)
        except grpc.aio.AioRpcError as exc:
            # The HTTP caller sent `cursor`: name it, not the gRPC field behind it.
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and rpc_error_field(exc) == "page_token":
                raise InvalidArgument("is not a cursor this service issued (use next_cursor of a page)",
                                      "cursor") from None
            raise
        return _household_to_json(r)

    @api.post("/v1/assign", response_model=AssignOut,
              responses={404: {"model": models.ErrorOut, "description": "unknown account or session"}},
              summary="Which person of the household watched a session (with every person's probability)")
    async def post_assign(body: AssignIn, who: Principal = Depends(access("POST /v1/assign"))):
        request = cpb.AssignSessionRequest(account_id=body.account_id)
        if body.session_id is not None:
            request.session_id = body.session_id
        else:
            if not all(math.isfinite(v) for v in body.feature_vector):
                raise InvalidArgument("values must be finite", "feature_vector")
            # Sent as float32: a finite number past its range would become infinity in the
            # cast and be refused by clustering as "not finite" (until session 36).
            if any(abs(v) > FLOAT32_MAX for v in body.feature_vector):
                raise InvalidArgument(f"values must lie within float32's range (|v| <= {FLOAT32_MAX:.1e})",
                                      "feature_vector")
            request.feature_vector = F.to_bytes(np.asarray([body.feature_vector], dtype=np.float32))
            request.feature_schema_version = F.FEATURE_SCHEMA_VERSION
        a = (await clients.call("clustering", "AssignSession", request, who)).assignment
        return AssignOut(person_id=a.person_id, confidence=a.confidence,
                         probabilities=[PersonProbabilityOut(person_id=p.person_id, probability=p.probability)
                                        for p in a.probabilities],
                         model_variant=a.model_variant, model_version=a.model_version,
                         cold_start=_COLD_NAMES.get(a.cold_start), sessions_until_full_model=a.sessions_until_full_model,
                         prediction_id=a.prediction_id)

    return api
