"""Small protobuf <-> domain conversions shared by every servicer."""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument
from services.common.ids import check_query_ts


# What google.protobuf.Timestamp may hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_PB_MIN_SECONDS, _PB_MAX_SECONDS = -62135596800, 253402300799


def ts_to_float(message, field_name: str, field_path: str, required: bool = True,
                window: bool = False) -> float | None:
    """Seconds since the epoch of a Timestamp field, or InvalidArgument naming it.
    ``window``: a bound that selects (query or deletion window), held to 1970..2100
    (``ids.check_query_ts``); event times are bounded by the domain's ``check_ts``."""
    if not message.HasField(field_name):
        if required:
            raise InvalidArgument("is required", field_path)
        return None
    ts: Timestamp = getattr(message, field_name)
    if not (_PB_MIN_SECONDS <= ts.seconds <= _PB_MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000):
        raise InvalidArgument("not a valid timestamp (seconds or nanos out of range)", field_path)
    value = ts.seconds + ts.nanos / 1e9
    return check_query_ts(value, field_path) if window else value


def varint(n: int) -> bytes:
    """``n`` >= 0 as a protobuf base-128 varint (wire format)."""
    if 0 <= n < 0x80:           # the lengths of most strings and messages the services write
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def length_delimited(key: bytes, data: bytes) -> bytes:
    """A length-delimited field (string, bytes, message) of wire key ``key`` holding ``data``."""
    return key + varint(len(data)) + data


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
