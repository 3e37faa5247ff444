"""HTTP request/response models. Strict: unknown fields are refused, every string and
array is bounded, so a bad request gets a 4xx naming the field before any service is
called."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from services.common.errors import InvalidArgument
from services.common.ids import ID_PATTERN, MAX_ID_CHARS, MAX_QUERY_TS, MIN_QUERY_TS, check_ts
from services.common.text import TEXT_PATTERN

# An id is checked by its pattern alone, which bounds its length (1-128) too: with pydantic's
# own length bounds beside it, those ran first and a 129-character id got "String should
# have at most 128 characters", not the id rule every other bad id (and every gRPC caller)
# is told (session 33; gateway/app.py _rule_in_words). The bounds stay in the schema.
ID_LENGTH_SCHEMA = {"minLength": 1, "maxLength": MAX_ID_CHARS}
Id = Annotated[str, Field(pattern=ID_PATTERN, json_schema_extra=ID_LENGTH_SCHEMA)]
# Free text is stored as data: any text under the one text rule (services/common/text.py:
# no control characters — a NUL cannot even be stored in PostgreSQL text — no line
# separators, no bidirectional overrides).
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)]

# Timestamps are RFC 3339 strings with an offset (a number such as 1700000000 or 0.5 is
# refused, not read as Unix seconds), in a documented range:
# * times of things that happened (events, touchpoints, conversions, feedback): from
#   2000-01-01 to MAX_FUTURE_SKEW_S (10 minutes) ahead of the server's clock;
# * bounds that select (query and deletion windows): from 1970-01-01 to 2100-01-01.
# The services apply the same bounds (services/common/ids.py) to gRPC callers; event times
# are checked by the same function (ids.check_ts).
QUERY_RANGE = (datetime.fromtimestamp(MIN_QUERY_TS, timezone.utc), datetime.fromtimestamp(MAX_QUERY_TS, timezone.utc))
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339_text(value: object) -> object:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 timestamp with an offset, e.g. 2026-11-26T20:15:00Z")
    return value


def _in_range(value: datetime, low: datetime, high: datetime, words: str) -> datetime:
    try:
        if not low <= value <= high:
            raise ValueError(f"must lie between {words}")
        value.timestamp()  # representable as Unix seconds (protobuf Timestamp)
    except OverflowError:
        raise ValueError(f"must lie between {words}") from None
    return value


def _event_time(value: datetime) -> datetime:
    check_ts(value.timestamp(), "")   # the services' one rule; InvalidArgument is a ValueError, as pydantic needs
    return value


def _window_bound(value: datetime) -> datetime:
    return _in_range(value, *QUERY_RANGE, "1970-01-01 and 2100-01-01")


# strict=False only lets the RFC 3339 text be parsed; _rfc3339_text refuses anything else.
Timestamp = Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_rfc3339_text),
                      AfterValidator(_event_time)]
WindowBound = Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_rfc3339_text),
                        AfterValidator(_window_bound)]


def check_window(start: datetime | None, end: datetime | None) -> None:
    """An empty window refused naming the HTTP field ``end``: the services refuse it too,
    naming their gRPC field ``window.end``, which an HTTP caller never sent (until session 32)."""
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("must be after start", "end")


DeviceType = Literal["tv", "mobile", "tablet", "desktop", "console", "other"]
EventKind = Literal["play_start", "play_stop", "heartbeat", "browse"]
Maturity = Literal["kids", "teen", "adult"]


class Strict(BaseModel):
    # strict: no lax coercion ("vpn": "yes", "processing": "no", "duration_s": "60" are
    # refused naming the field, not read as true/false/60).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, strict=True)


class EventIn(Strict):
    event_id: Id
    account_id: Id
    device_id: Id
    device_type: DeviceType
    ts: Timestamp = Field(description="UTC timestamp, RFC 3339 with offset (e.g. 2026-11-26T20:15:00Z), "
                                      "from 2000-01-01 to 10 minutes from now")
    kind: EventKind
    title_id: Id | None = None
    series_id: Id | None = None
    genres: list[Label] = Field(default_factory=list, max_length=16)
    duration_s: float = Field(0.0, ge=0, le=86400)
    maturity: Maturity | None = None
    country: Annotated[str, Field(max_length=2, pattern=r"^[A-Z]{2}$")] | None = None
    vpn: bool = False
    profile_hint: Label | None = None
    utc_offset_minutes: int | None = Field(
        None, ge=-840, le=840,
        description="the device's UTC offset at ts, in minutes (local time = ts + offset; e.g. -300 in New "
                    "York in winter, 60 in Paris, 330 in India); absent: UTC. The session's hour and weekday "
                    "features are local to its first event's offset")


class EventsIn(Strict):
    events: list[EventIn] = Field(min_length=1, max_length=10_000)


class EventStatusIn(Strict):
    account_id: Id
    event_ids: list[Id] = Field(min_length=1, max_length=10_000,
                                description="the event ids of one household's events (an ingest batch's bound)")


class EventStatusOut(BaseModel):
    account_id: str
    stored: list[str] = Field(description="held now: a resend changes nothing")
    erased: list[str] = Field(description="stored, then deleted by an erasure: a resend is ignored as a duplicate "
                                          "(only to callers who may send events; others get these in not_stored)")
    not_stored: list[str] = Field(description="never stored (lost with the request, or refused as late or "
                                              "expired): resend these")


class IngestOut(BaseModel):
    accepted: int
    duplicates: int
    rejected_late: int
    sessions_touched: int
    # Older than the retention window (HEARTH_RETENTION_DAYS): not stored (docs/privacy.md §7).
    rejected_expired: int = 0


class DeviceOut(BaseModel):
    device_id: str
    device_type: str
    session_count: int
    last_seen: datetime


class SessionOut(BaseModel):
    session_id: str
    device_id: str
    start: datetime
    end: datetime
    event_count: int
    watch_seconds: float
    closed: bool
    feature_schema_version: int
    feature_vector: list[float] | None = Field(None, description="present once the session is closed")
    person_id: str | None = None
    person_probability: float | None = Field(None, description="probability of person_id (null until assigned)")
    zero_watch: bool = Field(False, description="no watch time: a browsing or stopped-start fragment")


class PersonOut(BaseModel):
    person_id: str
    session_count: int
    peak_hours: list[int] = Field(description="start of each 2-hour bin where the person mostly watches (local "
                                  "time for sessions whose events carry utc_offset_minutes, UTC otherwise): "
                                  "the top bin, and the second when it holds at least half as many sessions")
    peak_days: list[str]
    devices: list[str]
    top_genres: list[str]
    kids_share: float


class DriftOut(BaseModel):
    drift_type: str
    severity: float
    statistic: float
    detected_at: datetime
    refit_triggered: bool


class ModelStatusOut(BaseModel):
    model_version: int
    sessions_in_model: int = Field(description="closed sessions the model has folded in")
    sessions_pending: int = Field(description="closed sessions not yet folded in (they already carry persons)")
    last_refit: datetime | None = Field(None, description="last fit on every session")
    persons: int = Field(description="persons the household's answers name: the model's, and any a feedback label "
                                     "named that the model has not fitted yet (listed without a profile)")
    settled: bool = Field(description="true when the model has caught up with the stored sessions: nothing pending, "
                          "or fewer than 10 pending on a model past its cold start (they carry the current "
                          "model's answers and are folded in with later sessions); assignments move only when "
                          "new sessions or labels arrive")
    unknown_genres: dict[str, int] = Field(default_factory=dict, description=(
        "genre names the household's events carried that the genre vocabulary does not know, with how many "
        "events carry each (counted in a genre slot chosen by a hash of the name and in `other`; "
        "HEARTH_GENRE_ALIASES maps a name to a feature genre)"))


class HouseholdOut(BaseModel):
    account_id: str
    devices: list[DeviceOut] = Field(description="the devices of this page's sessions (session counts over the "
                                     "whole household); page through the sessions for the others")
    sessions: list[SessionOut] = Field(description="one page, newest first")
    persons: list[PersonOut]
    drift_events: list[DriftOut]
    model_version: int
    model_variant: str
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last page")
    truncated: bool = Field(False, description="more sessions exist than this page holds")
    total_sessions: int = 0
    status: ModelStatusOut | None = None
    total_devices: int = Field(0, description="every device of the household (`devices` lists this page's)")


class ErrorBody(BaseModel):
    code: str
    field: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


class HealthOut(BaseModel):
    status: Literal["SERVING", "DEGRADED", "NOT_SERVING"] = Field(
        description="SERVING: every service serves with every dependency; DEGRADED: some service or "
                    "dependency is down (the routes of the services that serve still work); "
                    "NOT_SERVING: no service answers")
    services: dict[str, str]
    reasons: dict[str, str] = Field(default_factory=dict,
                                    description="why a service is degraded (database, redis, peers)")
