"""Attribution through the gateway: record touchpoints and conversions, get credit."""

from __future__ import annotations

import os
import time

import httpx
from tests.helpers.timestamps import iso_utc as _iso

# The services' consent cache (tests/conftest.py sets it for every mesh of the run).
CONSENT_CACHE_S = float(os.environ["HEARTH_CONSENT_CACHE_S"])


def test_attribution_round_trip(mesh):
    t0 = time.time() - 5 * 86400
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        touches = [{"touchpoint_id": f"e2e-tp-{i}", "account_id": "e2e-att", "device_id": "tv-1",
                    "ts": _iso(t0 + i * 3600), "channel": ["search", "email", "tv"][i % 3], "campaign": "spring"}
                   for i in range(6)]
        r = client.post("/v1/touchpoints", json={"touchpoints": touches})
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 6, "duplicates": 0, "rejected_expired": 0}
        r = client.post("/v1/conversions", json={"conversions": [
            {"conversion_id": "e2e-conv-1", "account_id": "e2e-att", "ts": _iso(t0 + 7 * 3600),
             "kind": "subscribe", "value": 12.5}]})
        assert r.json()["accepted"] == 1
        r = client.post("/v1/attribution", json={"account_ids": ["e2e-att"], "method": "shapley",
                                                 "level": "household"})
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        credit = {c["channel"]: c["conversions"] for c in result["credit"]["channels"]}
        # Shapley with the standard coalition value: the one conversion splits evenly
        # over the three distinct channels of its journey.
        assert credit.keys() == {"search", "email", "tv"}
        assert all(abs(v - 1 / 3) < 1e-9 for v in credit.values())
        assert result["total_revenue"] == 12.5
        bad = client.post("/v1/attribution", json={"markov_order": 9})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "markov_order"

        # Intervals, the auto order, time decay, sequences through the gateway.
        r = client.post("/v1/attribution", json={
            "account_ids": ["e2e-att"], "method": "time_decay", "level": "household", "half_life_days": 0.1,
            "markov_order_auto": True, "bootstrap_replicates": 40, "bootstrap_seed": 5,
            "sequences": ["search > email"]})
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["bootstrap_replicates"] == 40 and result["confidence_level"] == 0.95
        decay = {c["channel"]: c for c in result["credit"]["channels"]}
        # Half-life 2.4 h: tv's touches are 2 h and 5 h old at the conversion, email's
        # 3 h and 6 h, so tv gets more than email (linear would split them equally).
        assert decay["tv"]["conversions"] > decay["email"]["conversions"]
        assert all(c["conversions_interval"][0] <= c["conversions"] + 1e-9 for c in decay.values())
        assert {b["method"] for b in result["baselines"]} >= {"time_decay", "position_based"}
        assert result["sequences"][0]["sequence"] == "search > email"
        assert result["order_selection"]["chosen"] == result["markov_order"] == 1
        bad = client.post("/v1/attribution", json={"bootstrap_replicates": 1})
        assert bad.status_code in (400, 422) and bad.json()["error"]["field"] == "bootstrap_replicates"
        bad = client.post("/v1/attribution", json={"position_weights": [0.5, 0.5, 0.5]})
        assert bad.status_code in (400, 422) and bad.json()["error"]["field"] == "position_weights"


def test_attribution_over_all_accounts_leaves_out_a_withdrawn_account(mesh):
    """POST /v1/attribution without account_ids pools every account's journeys: an account
    that withdrew its attribution consent (PUT /v1/consent) is left out within the
    staleness bound, HEARTH_CONSENT_CACHE_S (5 s in production; the tests' meshes: 1 s)
    (until session 18 its journeys were still credited)."""
    t0 = time.time() - 3 * 86400
    with httpx.Client(base_url=mesh.url, headers={"X-API-Key": mesh.api_key}, timeout=30) as client:
        for account, channel in (("e2e-att-kept", "e2e_kept_ch"), ("e2e-att-gone", "e2e_gone_ch")):
            r = client.post("/v1/touchpoints", json={"touchpoints": [{
                "touchpoint_id": f"{account}-tp", "account_id": account, "device_id": "tv-1",
                "ts": _iso(t0), "channel": channel, "campaign": "c"}]})
            assert r.status_code == 200, r.text
            r = client.post("/v1/conversions", json={"conversions": [{
                "conversion_id": f"{account}-c", "account_id": account, "ts": _iso(t0 + 600),
                "kind": "subscribe", "value": 1.0}]})
            assert r.status_code == 200, r.text

        def channels() -> set[str]:
            r = client.post("/v1/attribution", json={"method": "linear", "level": "household"})
            assert r.status_code == 200, r.text
            (result,) = r.json()["results"]
            return {c["channel"] for c in result["credit"]["channels"] if c["conversions"] > 0}

        assert {"e2e_kept_ch", "e2e_gone_ch"} <= channels()
        r = client.put("/v1/consent/e2e-att-gone", json={"processing": True, "attribution": False})
        assert r.status_code == 200, r.text
        withdrawn_at = time.monotonic()
        while "e2e_gone_ch" in channels():
            assert time.monotonic() - withdrawn_at < CONSENT_CACHE_S + 2.0, "still credited past the staleness bound"
            time.sleep(0.5)
        assert "e2e_kept_ch" in channels()
