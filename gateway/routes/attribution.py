"""Routes backed by the attribution service: touchpoints and conversions in, credit out."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AfterValidator, BaseModel, Field

from gateway.models import Id, Strict, Timestamp, WindowBound, check_window
from gateway.routes import api_router
from hearth.attribution.v1 import attribution_pb2 as apb
from hearth.common.v1 import common_pb2
from services.common.identity import Principal
from services.common.pbutil import float_to_ts
from services.common.text import TEXT_PATTERN

Channel = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}$")]
Campaign = Annotated[str, Field(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63})?$")]
_METHODS = {"markov": apb.METHOD_MARKOV, "shapley": apb.METHOD_SHAPLEY, "hybrid": apb.METHOD_HYBRID,
            "first_touch": apb.METHOD_FIRST_TOUCH, "last_touch": apb.METHOD_LAST_TOUCH,
            "linear": apb.METHOD_LINEAR, "time_decay": apb.METHOD_TIME_DECAY,
            "position_based": apb.METHOD_POSITION_BASED}
_LEVELS = {"person": apb.LEVEL_PERSON, "household": apb.LEVEL_HOUSEHOLD, "both": apb.LEVEL_BOTH}


def _whole_seconds(days: float) -> float:
    """The lookback travels as whole seconds (``lookback_seconds``, 0 meaning the 30-day
    default): less than one second cannot be sent as asked (until session 36 it was cut to
    0 and answered with 30 days)."""
    if round(days * 86400) < 1:
        raise ValueError("must be at least one second (1/86400 = 1.2e-05 days): the lookback is counted in "
                         "whole seconds")
    return days


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
    rejected_expired: int = Field(0, description="older than the retention window (HEARTH_RETENTION_DAYS) while "
                                                 "the retention purge is on: not stored (docs/privacy.md §7)")


class PersonaIn(Strict):
    account_id: Id
    person_id: Id
    persona: str = Field(max_length=64, pattern=TEXT_PATTERN)


class AttributionIn(Strict):
    account_ids: list[Id] = Field(default_factory=list, max_length=1000,
                                  description="empty = every account")
    start: WindowBound | None = None
    end: WindowBound | None = None
    method: Literal["markov", "shapley", "hybrid", "first_touch", "last_touch", "linear", "time_decay",
                    "position_based"] = "hybrid"
    markov_order: int = Field(1, ge=1, le=4)
    hybrid_alpha: float = Field(0.5, ge=0, le=1, description="weight of Markov in the hybrid")
    lookback_days: Annotated[float, Field(gt=0, le=365), AfterValidator(_whole_seconds)] = 30
    repeats: Literal["collapse_states", "collapse_channels", "keep"] = "collapse_states"
    include_nulls: bool = True
    horizon: int = Field(0, ge=0, le=1000)
    level: Literal["person", "household", "both"] = "both"
    markov_order_auto: bool = Field(False, description="choose the order 1..4 by held-out conversion log loss")
    bootstrap_replicates: int = Field(0, ge=0, le=2000, description="0 = no intervals, else >= 2")
    bootstrap_seed: int = Field(0, ge=0, le=2**63 - 1)
    confidence_level: float = Field(0.95, ge=0.5, lt=1.0)
    half_life_days: float = Field(7.0, gt=0, le=3650, description="time-decay heuristic")
    position_weights: list[float] = Field(default_factory=lambda: [0.4, 0.2, 0.4], min_length=3, max_length=3,
                                          description="position-based first, middle, last (sum 1)")
    sequences: list[Annotated[str, Field(min_length=1, max_length=700, pattern=TEXT_PATTERN)]] = Field(
        default_factory=list, max_length=50, description='channel sequences "a > b": exact removal effects')
    persona_prior_strength: float = Field(0.0, ge=0, le=1e6,
                                          description="Dirichlet persona prior on each person's chain; 0 = off")
    personas: list[PersonaIn] = Field(default_factory=list, max_length=10_000)


class ChannelCreditOut(BaseModel):
    channel: str
    share: float
    conversions: float
    revenue: float
    conversions_interval: list[float] | None = None
    revenue_interval: list[float] | None = None
    share_interval: list[float] | None = None
    conversions_se: float | None = None


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
    markov_order: int | None = None
    order_selection: dict[str, Any] | None = None
    sequences: list[dict[str, Any]] = Field(default_factory=list)
    bootstrap_replicates: int = 0
    confidence_level: float | None = None
    persona_prior_strength: float = 0.0
    persona_prior_journeys: float = 0.0


class AttributionOut(BaseModel):
    results: list[AttributionResultOut]


def _interval(c: apb.ChannelCredit, name: str) -> list[float] | None:
    return [getattr(c, name).lower, getattr(c, name).upper] if c.HasField(name) else None


def _table(t: apb.CreditTable) -> CreditTableOut:
    return CreditTableOut(method=t.method, channels=[
        ChannelCreditOut(channel=c.channel, share=c.share, conversions=c.conversions, revenue=c.revenue,
                         conversions_interval=_interval(c, "conversions_interval"),
                         revenue_interval=_interval(c, "revenue_interval"),
                         share_interval=_interval(c, "share_interval"),
                         conversions_se=c.conversions_se if c.HasField("conversions_interval") else None)
        for c in t.channels])


def _result(x: apb.AttributionResult) -> AttributionResultOut:
    sel = None
    if x.HasField("order_selection"):
        o = x.order_selection
        sel = {"chosen": o.chosen, "log_loss": {str(k): v for k, v in sorted(o.log_loss.items())},
               "log_loss_se": {str(k): v for k, v in sorted(o.log_loss_se.items())},
               "margin": o.margin, "margin_se": o.margin_se, "margin_vs_order1": o.margin_vs_order1,
               "margin_vs_order1_se": o.margin_vs_order1_se, "fallback": o.fallback or None,
               "at_upper_bound": o.at_upper_bound}
    return AttributionResultOut(
        scope=x.scope, account_id=x.account_id or None, person_id=x.person_id or None,
        credit=_table(x.credit), baselines=[_table(b) for b in x.baselines], journeys=x.journeys,
        total_conversions=x.total_conversions, total_revenue=x.total_revenue,
        markov_order=x.markov_order or None, order_selection=sel,
        sequences=[{"sequence": e.sequence, "removal_effect": e.removal_effect,
                    "removal_effect_value": e.removal_effect_value, "conversions_lost": e.conversions_lost,
                    "value_lost": e.value_lost} for e in x.sequences],
        bootstrap_replicates=x.bootstrap_replicates, confidence_level=x.confidence_level or None,
        persona_prior_strength=x.persona_prior_strength, persona_prior_journeys=x.persona_prior_journeys)


def router(clients, access) -> APIRouter:
    api = api_router()

    @api.post("/v1/touchpoints", response_model=RecordedOut,
              summary="Record marketing touchpoints (idempotent by touchpoint_id)")
    async def post_touchpoints(body: TouchpointsIn, who: Principal = Depends(access("POST /v1/touchpoints"))):
        request = apb.RecordTouchpointsRequest(touchpoints=[apb.Touchpoint(
            touchpoint_id=t.touchpoint_id, account_id=t.account_id, device_id=t.device_id,
            ts=float_to_ts(t.ts.timestamp()), channel=t.channel, campaign=t.campaign,
            person_id=t.person_id or "") for t in body.touchpoints])
        r = await clients.call("attribution", "RecordTouchpoints", request, who)
        return RecordedOut(accepted=r.accepted, duplicates=r.duplicates, rejected_expired=r.rejected_expired)

    @api.post("/v1/conversions", response_model=RecordedOut,
              summary="Record conversions (idempotent by conversion_id)")
    async def post_conversions(body: ConversionsIn, who: Principal = Depends(access("POST /v1/conversions"))):
        request = apb.RecordConversionsRequest(conversions=[apb.Conversion(
            conversion_id=c.conversion_id, account_id=c.account_id, ts=float_to_ts(c.ts.timestamp()),
            kind=c.kind, value=c.value, device_id=c.device_id or "") for c in body.conversions])
        r = await clients.call("attribution", "RecordConversions", request, who)
        return RecordedOut(accepted=r.accepted, duplicates=r.duplicates, rejected_expired=r.rejected_expired)

    @api.post("/v1/attribution", response_model=AttributionOut,
              summary="Credit channels per household and per person (Markov, Shapley, hybrid, heuristics)")
    async def post_attribution(body: AttributionIn, who: Principal = Depends(access("POST /v1/attribution"))):
        check_window(body.start, body.end)
        window = common_pb2.TimeRange()
        if body.start is not None:
            window.start.CopyFrom(float_to_ts(body.start.timestamp()))
        if body.end is not None:
            window.end.CopyFrom(float_to_ts(body.end.timestamp()))
        request = apb.AttributeRequest(
            account_ids=body.account_ids, method=_METHODS[body.method], markov_order=body.markov_order,
            hybrid_alpha=body.hybrid_alpha, hybrid_alpha_set=True,
            lookback_seconds=round(body.lookback_days * 86400), repeats=body.repeats,
            include_nulls=body.include_nulls, horizon=body.horizon, level=_LEVELS[body.level],
            markov_order_auto=body.markov_order_auto, bootstrap_replicates=body.bootstrap_replicates,
            bootstrap_seed=body.bootstrap_seed, confidence_level=body.confidence_level,
            half_life_days=body.half_life_days, position_weights=body.position_weights,
            sequences=body.sequences, persona_prior_strength=body.persona_prior_strength,
            personas=[apb.PersonPersona(account_id=p.account_id, person_id=p.person_id, persona=p.persona)
                      for p in body.personas])
        if body.start is not None or body.end is not None:
            request.window.CopyFrom(window)
        r = await clients.call("attribution", "Attribute", request, who, timeout_s=60)
        return AttributionOut(results=[_result(x) for x in r.results])

    return api
