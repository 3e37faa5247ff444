"""Timestamps as the HTTP API takes them (RFC 3339, UTC, whole seconds: ``...Z``)."""

from __future__ import annotations

import time


def iso_utc(ts: float) -> str:
    """``ts`` (seconds since the epoch) as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
