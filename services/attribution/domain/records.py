"""Touchpoints and conversions as the attribution domain sees them, with validation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from services.common.ids import check_id, check_ts
from services.common.errors import InvalidArgument

CHANNEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}$")
MAX_RECORDS_PER_BATCH = 10_000
MAX_VALUE = 1e9


@dataclass(frozen=True, slots=True)
class Touchpoint:
    touchpoint_id: str
    account_id: str
    device_id: str
    ts: float
    channel: str
    campaign: str = ""
    person_id: str | None = None


@dataclass(frozen=True, slots=True)
class Conversion:
    conversion_id: str
    account_id: str
    ts: float
    kind: str
    value: float = 0.0
    device_id: str | None = None


def _check_channel(value: str, field: str, allow_empty: bool = False) -> None:
    if (not value and not allow_empty) or (value and not CHANNEL_PATTERN.fullmatch(value)):
        raise InvalidArgument("must be 1-64 characters of letters, digits, space, '.', '_', ':', '/' "
                              "or '-'", field)


def validate_touchpoints(items: list[Touchpoint]) -> list[Touchpoint]:
    if len(items) > MAX_RECORDS_PER_BATCH:
        raise InvalidArgument(f"at most {MAX_RECORDS_PER_BATCH} per batch", "touchpoints")
    for i, t in enumerate(items):
        path = f"touchpoints[{i}]"
        check_id(t.touchpoint_id, f"{path}.touchpoint_id")
        check_id(t.account_id, f"{path}.account_id")
        check_id(t.device_id, f"{path}.device_id")
        check_ts(t.ts, f"{path}.ts")
        _check_channel(t.channel, f"{path}.channel")
        _check_channel(t.campaign, f"{path}.campaign", allow_empty=True)
        if t.person_id is not None:
            check_id(t.person_id, f"{path}.person_id")
    return items


def validate_conversions(items: list[Conversion]) -> list[Conversion]:
    if len(items) > MAX_RECORDS_PER_BATCH:
        raise InvalidArgument(f"at most {MAX_RECORDS_PER_BATCH} per batch", "conversions")
    for i, c in enumerate(items):
        path = f"conversions[{i}]"
        check_id(c.conversion_id, f"{path}.conversion_id")
        check_id(c.account_id, f"{path}.account_id")
        check_ts(c.ts, f"{path}.ts")
        _check_channel(c.kind, f"{path}.kind")
        if not (isinstance(c.value, (int, float)) and math.isfinite(c.value) and 0 <= c.value <= MAX_VALUE):
            raise InvalidArgument(f"must be a finite number in 0..{MAX_VALUE:g}", f"{path}.value")
        if c.device_id is not None:
            check_id(c.device_id, f"{path}.device_id")
    return items
