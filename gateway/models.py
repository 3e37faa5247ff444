"""HTTP request/response models. Strict: unknown fields are refused, every string and
array is bounded, so a bad request gets a 4xx naming the field before any service is
called."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from services.common.ids import ID_PATTERN, MAX_ID_CHARS

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)]
# Free text is stored as data: any printable text, but no control characters (a NUL
# cannot even be stored in PostgreSQL text, and none belongs in a label).
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1F\x7F]+$")]

# Timestamps must be plausible: not before the service could exist, not more than a day
# in the future (clock skew of a device, not a typo of the year).
EARLIEST_TS = datetime(2000, 1, 1, tzinfo=timezone.utc)
MAX_FUTURE = timedelta(days=1)


def _sane_timestamp(value: datetime) -> datetime:
    try:
        if value < EARLIEST_TS or value > datetime.now(timezone.utc) + MAX_FUTURE:
            raise ValueError(f"must be between {EARLIEST_TS.date()} and one day from now")
        value.timestamp()  # representable as Unix seconds (protobuf Timestamp)
    except OverflowError:
        raise ValueError("out of range") from None
    return value


Timestamp = Annotated[AwareDatetime, AfterValidator(_sane_timestamp)]
DeviceType = Literal["tv", "mobile", "tablet", "desktop", "console", "other"]
EventKind = Literal["play_start", "play_stop", "heartbeat", "browse"]
Maturity = Literal["kids", "teen", "adult"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class EventIn(Strict):
    event_id: Id
    account_id: Id
    device_id: Id
    device_type: DeviceType
    ts: Timestamp = Field(description="UTC timestamp, RFC 3339 with offset (e.g. 2026-11-26T20:15:00Z), "
                                      "from 2000-01-01 to one day from now")
    kind: EventKind
    title_id: Id | None = None
    series_id: Id | None = None
    genres: list[Label] = Field(default_factory=list, max_length=16)
    duration_s: float = Field(0.0, ge=0, le=86400)
    maturity: Maturity | None = None
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    vpn: bool = False
    profile_hint: Label | None = None


class EventsIn(Strict):
    events: list[EventIn] = Field(min_length=1, max_length=10_000)


class IngestOut(BaseModel):
    accepted: int
    duplicates: int
    rejected_late: int
    sessions_touched: int


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


class PersonOut(BaseModel):
    person_id: str
    session_count: int
    peak_hours: list[int]
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


class HouseholdOut(BaseModel):
    account_id: str
    devices: list[DeviceOut]
    sessions: list[SessionOut]
    persons: list[PersonOut]
    drift_events: list[DriftOut]
    model_version: int
    model_variant: str


class ErrorBody(BaseModel):
    code: str
    field: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


class HealthOut(BaseModel):
    status: Literal["SERVING", "DEGRADED"]
    services: dict[str, str]
