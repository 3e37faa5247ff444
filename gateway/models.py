"""HTTP request/response models. Strict: unknown fields are refused, every string and
array is bounded, so a bad request gets a 4xx naming the field before any service is
called."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
Label = Annotated[str, Field(min_length=1, max_length=64)]
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
    ts: AwareDatetime = Field(description="UTC timestamp, RFC 3339 with offset (e.g. 2026-11-26T20:15:00Z)")
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
