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


def loads_unambiguous(text: str | bytes) -> Any:
    """``json.loads`` that raises DuplicateKeyError on a repeated key, ValueError on
    NaN/Infinity and json.JSONDecodeError on malformed text."""
    return json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)


def loads_unique_keys(text: str | bytes) -> Any:
    """``json.loads`` that raises DuplicateKeyError on a repeated key (at any depth) and
    otherwise reads exactly as ``json.loads`` does (the gateway's request bodies)."""
    return json.loads(text, object_pairs_hook=_unique)
