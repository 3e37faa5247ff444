"""The gateway's shared rate-limit buckets when Redis's own clock steps (session 25,
clock25). The bucket script reads Redis's ``TIME`` and stores the time of the last take
beside the tokens; redis-server (jemalloc) cannot run under libfaketime (libfaketime issue
#130), so a step is set up as the state it leaves behind: the stored time an hour ahead of
Redis's clock (its clock stepped back since the last take) or a year behind it (stepped
forward). Real redis-server, the gateway's real script."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis

from gateway.ratelimit import RedisBuckets


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def test_a_shared_bucket_is_not_locked_out_by_a_step_of_redis_clock(redis_url):
    prefix = f"clock{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_url)
    per_s, burst = 2.0, 3

    async def takes(n: int) -> list[float]:
        buckets = RedisBuckets(redis_url, prefix=prefix)
        try:
            return [await buckets.take("p:route", per_s, burst) for _ in range(n)]
        finally:
            await buckets.close()

    try:
        # Stepped back an hour since the bucket ran dry: no refill for the step (its stored
        # time is "later"), but the next take restarts from Redis's now, so the wait is one
        # token's (0.5 s), not the hour.
        client.hset(prefix + "p:route", mapping={"tokens": "0", "ts": repr(_redis_now(client) + 3600)})
        first = asyncio.run(takes(1))[0]
        assert first == pytest.approx(1 / per_s, abs=0.05), first
        assert 0 < client.pttl(prefix + "p:route") <= (burst / per_s + 1) * 1000   # expiry relative to now
        asyncio.run(asyncio.sleep(1 / per_s + 0.1))
        assert asyncio.run(takes(1)) == [0.0]
        # Stepped forward a year: the bucket is full (as after any idle time), no more.
        client.hset(prefix + "p:route", mapping={"tokens": "0", "ts": repr(_redis_now(client) - 400 * 86400)})
        waits = asyncio.run(takes(burst + 1))
        assert waits[:burst] == [0.0] * burst and waits[burst] > 0
    finally:
        client.delete(prefix + "p:route")
        client.close()
