"""Small protobuf <-> domain conversions shared by every servicer."""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument


def ts_to_float(message, field_name: str, field_path: str, required: bool = True) -> float | None:
    """Seconds since the epoch of a Timestamp field, or InvalidArgument naming it."""
    if not message.HasField(field_name):
        if required:
            raise InvalidArgument("is required", field_path)
        return None
    ts: Timestamp = getattr(message, field_name)
    return ts.seconds + ts.nanos / 1e9


def float_to_ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    whole = math.floor(seconds)
    ts.seconds = int(whole)
    ts.nanos = int(round((seconds - whole) * 1e9)) % 1_000_000_000
    return ts


def enum_to_name(value: int, enum_descriptor, prefix: str, field_path: str) -> str:
    """EVENT_KIND_PLAY_START -> "play_start"; UNSPECIFIED or unknown -> InvalidArgument."""
    try:
        name = enum_descriptor.values_by_number[value].name
    except KeyError:
        raise InvalidArgument(f"unknown value {value}", field_path) from None
    if name.endswith("_UNSPECIFIED"):
        raise InvalidArgument("is required", field_path)
    return name[len(prefix):].lower()


def name_to_enum(name: str, enum_descriptor, prefix: str) -> int:
    value = enum_descriptor.values_by_name.get(prefix + name.upper())
    return value.number if value else 0
