"""The mesh `make verify` measures (bench/verify.py ``mesh_settings``) runs without the
per-client bounds: all of its traffic comes from one API key, so the token buckets and the
per-principal in-flight caps of the costly routes would refuse what is capacity to measure.
With the gateway's default caps, the mixed traffic's attributions were refused 429
too_many_in_flight whenever a third one was in flight: `tests/e2e/test_verify_quick.py`
failed at its lowest rate on a loaded machine (6 of 100 requests; session 24)."""

from __future__ import annotations

import json

from bench.verify import mesh_settings
from gateway.config import GatewaySettings
from gateway.ratelimit import DEFAULT_IN_FLIGHT_LIMITS, in_flight_table


def test_the_harness_mesh_has_no_per_principal_in_flight_cap(monkeypatch):
    settings = mesh_settings()
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    gateway = GatewaySettings()
    assert DEFAULT_IN_FLIGHT_LIMITS and in_flight_table(gateway.in_flight_limits) == {}
    bucket = json.loads(settings["HEARTH_RATE_LIMIT_DEFAULT"])
    assert gateway.rate_limit_default.per_s >= 1e6 and bucket["burst"] >= 1e6
