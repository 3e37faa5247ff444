"""Numbers the HTTP models accept but the gRPC message behind them cannot carry as sent,
through the real gateway and services (review36, session 36).

* ``lookback_days`` travels as whole seconds (``lookback_seconds``, where 0 means "the
  default, 30 days"). Until session 36 the gateway truncated ``lookback_days * 86400`` to
  an int, so any lookback under one second (``1e-6``, allowed by ``gt=0``) became 0 and
  was answered with 30 days' credit, 200, and 0.7 days was cut to 60,479 s.
* ``feature_vector`` travels as float32. A finite number past float32's range (``1e39``)
  passed the gateway's "finite" check, turned into infinity in the cast (a RuntimeWarning
  on the gateway's stderr, a raw line in its JSON log) and came back as "feature vectors
  must be finite" about numbers that were finite.
"""

from __future__ import annotations

import time

import httpx

from services.clustering.domain import features as F
from tests.helpers.timestamps import iso_utc


def test_a_lookback_under_one_second_is_refused_naming_lookback_days_not_read_as_30_days(mesh):
    t0 = time.time() - 3 * 86400
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=60) as client:
        r = client.post("/v1/touchpoints", json={"touchpoints": [
            {"touchpoint_id": "lb36-tp", "account_id": "lb36", "device_id": "tv-1", "ts": iso_utc(t0),
             "channel": "email"}]})
        assert r.status_code == 200, r.text
        r = client.post("/v1/conversions", json={"conversions": [
            {"conversion_id": "lb36-cv", "account_id": "lb36", "ts": iso_utc(t0 + 3600), "kind": "signup"}]})
        assert r.status_code == 200, r.text

        def credit(lookback_days):
            r = client.post("/v1/attribution", json={"account_ids": ["lb36"], "level": "household",
                                                     "method": "linear", "lookback_days": lookback_days})
            return r, ({c["channel"]: c["conversions"] for c in r.json()["results"][0]["credit"]["channels"]}
                       if r.status_code == 200 else None)

        # The touch is an hour before the conversion: a 2-hour lookback credits it, a
        # 30-minute one does not (the lookback is honoured as given).
        r, shares = credit(2 / 24)
        assert r.status_code == 200 and shares == {"email": 1.0}, r.text
        r, shares = credit(0.5 / 24)
        assert r.status_code == 200 and shares.get("email", 0.0) == 0.0, r.text
        # Under one second cannot be sent as whole seconds: refused, not turned into the
        # 30-day default (which credited the touch: {"email": 1.0}).
        for tiny in (1e-6, 1e-300, 0.4 / 86400):
            r, shares = credit(tiny)
            assert r.status_code == 422, (tiny, r.status_code, r.text)
            assert r.json()["error"]["field"] == "lookback_days", r.text
            assert "second" in r.json()["error"]["message"], r.text
        r, shares = credit(1 / 86400)      # one second is the least: accepted
        assert r.status_code == 200, r.text


def test_a_feature_value_past_float32_is_refused_as_out_of_range_at_the_gateway(mesh):
    dim = F.FEATURE_DIM
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=60) as client:
        for value in (1e39, -1e300, 3.5e38):
            r = client.post("/v1/assign", json={"account_id": "f32-36", "feature_vector": [value] * dim})
            assert r.status_code == 422, (value, r.text)
            body = r.json()["error"]
            assert body["field"] == "feature_vector", r.text
            # Named as what it is: the caller's finite number is out of float32's range.
            assert "finite" not in body["message"] and "3.4e+38" in body["message"], r.text
    # No raw warning line in the gateway's JSON log (the cast no longer overflows).
    assert "overflow encountered" not in (mesh.log_dir / "gateway.log").read_text()
