"""Rate limits through two real gateway replicas that share one Redis budget: the limit
trips at the configured burst, answers 429 with Retry-After, is shared by the replicas,
and recovers at the configured rate."""

from __future__ import annotations

import time

import httpx

from gateway import auth

from .conftest import LIMIT_BURST, LIMIT_PER_S

ROUTE = "/v1/household/sec-rl-nobody"


def test_limit_trips_is_shared_by_replicas_and_recovers(security_mesh):
    _, key = auth.add_key(security_mesh.keys_file, "sec-ratelimited", "data_scientist")
    a, b = security_mesh.limited_urls
    headers = {"X-API-Key": key}
    statuses = []
    started = time.monotonic()
    for i in range(LIMIT_BURST + 1):  # alternate replicas: one budget, not two
        statuses.append(httpx.get((a if i % 2 == 0 else b) + ROUTE, headers=headers, timeout=10))
    elapsed = time.monotonic() - started
    assert elapsed < 1 / LIMIT_PER_S, "too slow to test the burst deterministically"
    assert [r.status_code for r in statuses[:LIMIT_BURST]] == [404] * LIMIT_BURST  # allowed (no data)
    limited = statuses[LIMIT_BURST]
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 1 / LIMIT_PER_S + 1

    # Another principal is not affected by this one's budget.
    other = httpx.get(a + ROUTE, headers={"X-API-Key": security_mesh.role_keys[next(iter(security_mesh.role_keys))]},
                      timeout=10)
    assert other.status_code != 429

    time.sleep(retry_after)
    recovered = httpx.get(b + ROUTE, headers=headers, timeout=10)
    assert recovered.status_code == 404
    # At one token per 4 s, the very next request is refused again.
    assert httpx.get(a + ROUTE, headers=headers, timeout=10).status_code == 429


def test_denied_and_unauthenticated_requests_do_not_spend_the_budget(security_mesh):
    _, key = auth.add_key(security_mesh.keys_file, "sec-ratelimited-analyst", "analyst")
    a, _ = security_mesh.limited_urls
    for _ in range(LIMIT_BURST + 2):  # analyst may not read households: 403, not 429
        assert httpx.get(a + ROUTE, headers={"X-API-Key": key}, timeout=10).status_code == 403
