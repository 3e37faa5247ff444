"""Routes backed by the attribution service: touchpoints and conversions in, credit out."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from gateway.models import Id, Strict, Timestamp, WindowBound
from gateway.routes import ERROR_RESPONSES
from hearth.attribution.v1 import attribution_pb2 as apb
from hearth.common.v1 import common_pb2
from services.common.identity import Principal
from services.common.pbutil import float_to_ts

Channel = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}$")]
Campaign = Annotated[str, Field(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63})?$")]
_METHODS = {"markov": apb.METHOD_MARKOV, "shapley": apb.METHOD_SHAPLEY, "hybrid": apb.METHOD_HYBRID,
            "first_touch": apb.METHOD_FIRST_TOUCH, "last_touch": apb.METHOD_LAST_TOUCH,
            "linear": apb.METHOD_LINEAR}
_LEVELS = {"person": apb.LEVEL_PERSON, "household": apb.LEVEL_HOUSEHOLD, "both": apb.LEVEL_BOTH}


class TouchpointIn(Strict):
    touchpoint_id: Id
    account_id: Id
    device_id: Id
    ts: Timestamp
    channel: Channel
    campaign: Campaign = ""
    person_id: Id | None = Field(None, description="known person; otherwise resolved by clustering")


class TouchpointsIn(Strict):
    touchpoints: list[TouchpointIn] = Field(min_length=1, max_length=10_000)


class ConversionIn(Strict):
    conversion_id: Id
    account_id: Id
    ts: Timestamp
    kind: Channel
    value: float = Field(0.0, ge=0, le=1e9)
    device_id: Id | None = None


class ConversionsIn(Strict):
    conversions: list[ConversionIn] = Field(min_length=1, max_length=10_000)


class RecordedOut(BaseModel):
    accepted: int
    duplicates: int


class AttributionIn(Strict):
    account_ids: list[Id] = Field(default_factory=list, max_length=1000,
                                  description="empty = every account")
    start: WindowBound | None = None
    end: WindowBound | None = None
    method: Literal["markov", "shapley", "hybrid", "first_touch", "last_touch", "linear"] = "hybrid"
    markov_order: int = Field(1, ge=1, le=4)
    hybrid_alpha: float = Field(0.5, ge=0, le=1, description="weight of Markov in the hybrid")
    lookback_days: float = Field(30, gt=0, le=365)
    repeats: Literal["collapse_states", "collapse_channels", "keep"] = "collapse_states"
    include_nulls: bool = True
    horizon: int = Field(0, ge=0, le=1000)
    level: Literal["person", "household", "both"] = "both"


class ChannelCreditOut(BaseModel):
    channel: str
    share: float
    conversions: float
    revenue: float


class CreditTableOut(BaseModel):
    method: str
    channels: list[ChannelCreditOut]


class AttributionResultOut(BaseModel):
    scope: Literal["household", "person"]
    account_id: str | None
    person_id: str | None
    credit: CreditTableOut
    baselines: list[CreditTableOut]
    journeys: float
    total_conversions: float
    total_revenue: float


class AttributionOut(BaseModel):
    results: list[AttributionResultOut]


def _table(t: apb.CreditTable) -> CreditTableOut:
    return CreditTableOut(method=t.method, channels=[
        ChannelCreditOut(channel=c.channel, share=c.share, conversions=c.conversions, revenue=c.revenue)
        for c in t.channels])


def router(clients, access) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/touchpoints", response_model=RecordedOut, responses=ERROR_RESPONSES,
              summary="Record marketing touchpoints (idempotent by touchpoint_id)")
    async def post_touchpoints(body: TouchpointsIn, who: Principal = Depends(access("POST /v1/touchpoints"))):
        request = apb.RecordTouchpointsRequest(touchpoints=[apb.Touchpoint(
            touchpoint_id=t.touchpoint_id, account_id=t.account_id, device_id=t.device_id,
            ts=float_to_ts(t.ts.timestamp()), channel=t.channel, campaign=t.campaign,
            person_id=t.person_id or "") for t in body.touchpoints])
        r = await clients.call("attribution", "RecordTouchpoints", request, who)
        return RecordedOut(accepted=r.accepted, duplicates=r.duplicates)

    @api.post("/v1/conversions", response_model=RecordedOut, responses=ERROR_RESPONSES,
              summary="Record conversions (idempotent by conversion_id)")
    async def post_conversions(body: ConversionsIn, who: Principal = Depends(access("POST /v1/conversions"))):
        request = apb.RecordConversionsRequest(conversions=[apb.Conversion(
            conversion_id=c.conversion_id, account_id=c.account_id, ts=float_to_ts(c.ts.timestamp()),
            kind=c.kind, value=c.value, device_id=c.device_id or "") for c in body.conversions])
        r = await clients.call("attribution", "RecordConversions", request, who)
        return RecordedOut(accepted=r.accepted, duplicates=r.duplicates)

    @api.post("/v1/attribution", response_model=AttributionOut, responses=ERROR_RESPONSES,
              summary="Credit channels per household and per person (Markov, Shapley, hybrid, heuristics)")
    async def post_attribution(body: AttributionIn, who: Principal = Depends(access("POST /v1/attribution"))):
        window = common_pb2.TimeRange()
        if body.start is not None:
            window.start.CopyFrom(float_to_ts(body.start.timestamp()))
        if body.end is not None:
            window.end.CopyFrom(float_to_ts(body.end.timestamp()))
        request = apb.AttributeRequest(
            account_ids=body.account_ids, method=_METHODS[body.method], markov_order=body.markov_order,
            hybrid_alpha=body.hybrid_alpha, hybrid_alpha_set=True,
            lookback_seconds=int(body.lookback_days * 86400), repeats=body.repeats,
            include_nulls=body.include_nulls, horizon=body.horizon, level=_LEVELS[body.level])
        if body.start is not None or body.end is not None:
            request.window.CopyFrom(window)
        r = await clients.call("attribution", "Attribute", request, who, timeout_s=60)
        return AttributionOut(results=[AttributionResultOut(
            scope=x.scope, account_id=x.account_id or None, person_id=x.person_id or None,
            credit=_table(x.credit), baselines=[_table(b) for b in x.baselines], journeys=x.journeys,
            total_conversions=x.total_conversions, total_revenue=x.total_revenue) for x in r.results])

    return api
