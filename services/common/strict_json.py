"""JSON for signed artefacts (audit exports, deletion receipts): one reading only.

``json.loads`` keeps the last of two equal keys; another parser may keep the first. A
file that says ``{"outcome": "denied", "outcome": "success"}`` could then verify (the
verifier re-serialises the value it kept) while a person or another tool reads the other
value. Verifiers therefore refuse duplicate keys outright, and NaN/Infinity, which
canonical JSON never contains.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """An object in the text has the same key twice (the text is ambiguous)."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads`` for text from outside (a request field, a file, a webhook's body):
    text nested too deeply for the parser is a json.JSONDecodeError, as any malformed
    text. ``json.loads`` raises RecursionError there (a RuntimeError, which every caller's
    ``except ValueError`` let through): until attack30 a page token or a receipt of a
    thousand ``[`` answered INTERNAL, the rollback webhook dropped the connection and
    `hearth audit verify` printed a traceback."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def loads_unambiguous(text: str | bytes) -> Any:
    """``json.loads`` that raises DuplicateKeyError on a repeated key, ValueError on
    NaN/Infinity and json.JSONDecodeError on malformed text (nested too deeply included)."""
    return loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)


class NotUtf8Error(ValueError):
    """Bytes that are not UTF-8 text (JSON between systems is UTF-8: RFC 8259, 8.1)."""


def loads_unique_keys(text: str | bytes) -> Any:
    """``json.loads`` that raises DuplicateKeyError on a repeated key (at any depth) and
    otherwise reads exactly as ``json.loads`` does (the gateway's request bodies), except
    that bytes must be UTF-8 (a leading byte order mark is ignored, as RFC 8259 allows):
    ``json.loads`` also reads UTF-16 and UTF-32 bytes, which a proxy, a WAF or an audit tap
    in front of the gateway reads as UTF-8 — NUL-interleaved text their rules never match
    (NotUtf8Error)."""
    value = json.loads(text, object_pairs_hook=_unique)   # malformed: its own error, as ever
    if isinstance(text, (bytes, bytearray)) and json.detect_encoding(text) not in ("utf-8", "utf-8-sig"):
        # json.loads decoded by this guess (its own): NULs in the first four bytes mean
        # UTF-16 or UTF-32 to it. ASCII text in UTF-16 is valid UTF-8 too (with NULs), so
        # decoding as UTF-8 would not tell.
        raise NotUtf8Error("the body is not UTF-8 text (RFC 8259: JSON between systems is UTF-8)")
    return value
