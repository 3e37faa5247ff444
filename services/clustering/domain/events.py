"""Viewing events as the domain sees them, and their validation.

Validation lives here (not in the servicer or gateway) so every entry point — gRPC,
HTTP, bulk tools — refuses the same inputs with the same field names. Every check is
bounded: ids have a format and a length, arrays and strings have maxima, timestamps
lie in a sane range, numbers are finite.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from services.clustering.domain.features import DEVICE_TYPES, MATURITIES
from services.common.errors import InvalidArgument
from services.common.ids import check_id, check_ts
from services.common.text import check_text

EVENT_KINDS = ("play_start", "play_stop", "heartbeat", "browse")
COUNTRY_PATTERN = re.compile(r"^[A-Z]{2}$")
MAX_GENRES = 16
MAX_LABEL_LEN = 64
MAX_DURATION_S = 24 * 3600.0
MAX_EVENTS_PER_BATCH = 10_000
# A device's UTC offset in minutes (local = UTC + offset), within -14:00..+14:00: every
# time zone in use lies in -12:00 (Baker Island) .. +14:00 (Line Islands); the range is
# symmetric, as the IANA Etc/GMT zones are.
MAX_UTC_OFFSET_MINUTES = 14 * 60


@dataclass(frozen=True, slots=True)
class ViewingEvent:
    event_id: str
    account_id: str
    device_id: str
    device_type: str
    ts: float                      # UTC epoch seconds
    kind: str
    title_id: str = ""
    series_id: str | None = None
    genres: tuple[str, ...] = ()
    duration_s: float = 0.0
    maturity: str | None = None
    country: str | None = None
    vpn: bool = False
    profile_hint: str | None = None
    # The device's UTC offset at ``ts`` in minutes (local time = ts + 60 * offset), as a
    # streaming client knows it; None: not sent, the session's time features are UTC's.
    utc_offset_minutes: int | None = None


def _check_label(value: object, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_LABEL_LEN or (not value and not allow_empty):
        raise InvalidArgument(f"must be a string of 1-{MAX_LABEL_LEN} characters", field)
    return check_text(value, field, max_chars=MAX_LABEL_LEN)


def validate_event(event: ViewingEvent, field: str = "event", now: float | None = None) -> ViewingEvent:
    """Return the event (normalised) or raise InvalidArgument naming ``field.<name>``."""
    check_id(event.event_id, f"{field}.event_id")
    check_id(event.account_id, f"{field}.account_id")
    check_id(event.device_id, f"{field}.device_id")
    if event.device_type not in DEVICE_TYPES:
        raise InvalidArgument(f"must be one of {', '.join(DEVICE_TYPES)}", f"{field}.device_type")
    check_ts(event.ts, f"{field}.ts", now)
    if event.kind not in EVENT_KINDS:
        raise InvalidArgument(f"must be one of {', '.join(EVENT_KINDS)}", f"{field}.kind")
    if event.title_id:
        check_id(event.title_id, f"{field}.title_id")
    if event.series_id is not None:
        check_id(event.series_id, f"{field}.series_id")
    if len(event.genres) > MAX_GENRES:
        raise InvalidArgument(f"at most {MAX_GENRES} genres", f"{field}.genres")
    for i, genre in enumerate(event.genres):
        _check_label(genre, f"{field}.genres[{i}]")
    d = event.duration_s
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d) or not 0 <= d <= MAX_DURATION_S:
        raise InvalidArgument(f"must be a number of seconds in 0..{int(MAX_DURATION_S)}", f"{field}.duration_s")
    if event.maturity is not None and event.maturity not in MATURITIES:
        raise InvalidArgument(f"must be one of {', '.join(MATURITIES)}", f"{field}.maturity")
    if event.country is not None and not (isinstance(event.country, str) and COUNTRY_PATTERN.fullmatch(event.country)):
        raise InvalidArgument("must be an ISO 3166-1 alpha-2 code such as 'GB'", f"{field}.country")
    if not isinstance(event.vpn, bool):
        raise InvalidArgument("must be a boolean", f"{field}.vpn")
    if event.profile_hint is not None:
        _check_label(event.profile_hint, f"{field}.profile_hint")
    o = event.utc_offset_minutes
    if o is not None and (not isinstance(o, int) or isinstance(o, bool)
                          or not -MAX_UTC_OFFSET_MINUTES <= o <= MAX_UTC_OFFSET_MINUTES):
        raise InvalidArgument(f"must be a whole number of minutes in -{MAX_UTC_OFFSET_MINUTES}..{MAX_UTC_OFFSET_MINUTES}",
                              f"{field}.utc_offset_minutes")
    return event


def validate_batch(events: list[ViewingEvent], now: float | None = None) -> list[ViewingEvent]:
    if len(events) > MAX_EVENTS_PER_BATCH:
        raise InvalidArgument(f"at most {MAX_EVENTS_PER_BATCH} events per batch", "events")
    now = time.time() if now is None else now
    return [validate_event(e, f"events[{i}]", now) for i, e in enumerate(events)]
