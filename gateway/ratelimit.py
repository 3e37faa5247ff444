"""Request limits at the gateway: how often (token buckets per principal and route) and
how much (body size), plus the JSON shape of the errors they produce.

Token bucket: a bucket holds at most ``burst`` tokens and refills at ``per_s`` tokens per
second; a request takes one token or is refused with 429 and ``Retry-After`` = the
seconds until a token is back (rounded up, at least 1)::

    tokens = min(burst, tokens + (now - last) * per_s)
    allowed = tokens >= 1  ->  tokens -= 1
    retry_after = (1 - tokens) / per_s

Buckets live in process memory by default. With ``HEARTH_REDIS_URL`` they live in Redis
and one Lua script does read-refill-take-write atomically with Redis's own clock, so
every gateway replica draws from the same budget and replica clocks do not matter. If
Redis is unreachable the gateway falls back to its in-memory buckets (each replica then
enforces the limit alone) rather than refusing every request: the limit degrades, the
API stays up. The fallback is logged.

Body size: ``BodySizeLimit`` (ASGI) answers 413 when ``Content-Length`` is over the
limit, and also when a body without one (chunked) grows past it while being read; the
application never sees such a body.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from prometheus_client import Counter, Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import error_response
from gateway.transport import replaying_receive
from services.common.errors import ResourceExhausted
from services.common.identity import Principal, SecurityEvent, report_security_event
from services.common.permissions import normalize_route

log = logging.getLogger("hearth.gateway.limits")


class RateLimited(ResourceExhausted):
    """429; ``retry_after_s`` becomes the Retry-After header."""

    def __init__(self, route: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit exceeded for {route}; retry later", field="")
        self.retry_after_s = retry_after_s


class TooManyInFlight(RateLimited):
    """429 ``too_many_in_flight``: the principal already has ``limit`` requests of
    ``route`` in flight at this gateway replica (``InFlightLimits``)."""

    code_word = "too_many_in_flight"

    def __init__(self, route: str, limit: int) -> None:
        super().__init__(route, IN_FLIGHT_RETRY_AFTER_S)
        self.message = (f"at most {limit} request{'s' if limit != 1 else ''} to {route} in flight per caller "
                        f"(per gateway replica); retry when one has finished")
        self.limit = limit


# Costly routes: how many requests one principal may have in flight on each, per gateway
# replica (HEARTH_IN_FLIGHT_LIMITS replaces this table; docs/security.md, "Rate limits").
# Each of these holds an upstream worker for up to its 60 s deadline (attribution, the
# household export fanned out to every data holder) or streams a whole log (the audit
# export); a key rotation re-wraps every household's key, and a household's data key rotation
# holds a privacy worker through its ~70 s settle. A token bucket charges each one
# token, so within the default 50/s one analyst could hold every attribution worker.
DEFAULT_IN_FLIGHT_LIMITS = {"POST /v1/attribution": 2, "GET /v1/household/{account_id}/export": 2,
                            "GET /v1/audit/export": 2, "POST /v1/keys/rotate": 1,
                            "POST /v1/household/{account_id}/rotate-key": 1, "POST /v1/keys/rotate-households": 1}
# A refused client retries after this long: a slot frees when one of its own requests ends.
IN_FLIGHT_RETRY_AFTER_S = 1.0

IN_FLIGHT_HELD = Gauge("hearth_gateway_caller_in_flight",
                       "Requests holding a per-principal in-flight slot of a costly route (all principals)",
                       ["route"])
IN_FLIGHT_REFUSED = Counter("hearth_gateway_caller_in_flight_refused_total",
                            "Requests refused with 429 too_many_in_flight: their principal already had "
                            "its limit of the route in flight", ["route"])


def in_flight_table(overrides: dict[str, int]) -> dict[str, int]:
    """``DEFAULT_IN_FLIGHT_LIMITS`` with HEARTH_IN_FLIGHT_LIMITS on top (0: no bound)."""
    merged = dict(DEFAULT_IN_FLIGHT_LIMITS)
    for route, limit in overrides.items():   # as the matrix writes it (the setting may differ in case or names)
        merged.pop(next((r for r in merged if normalize_route(r) == normalize_route(route)), None), None)
        merged[route] = limit
    return {r: n for r, n in merged.items() if n > 0}


class InFlightLimits:
    """At most ``limits[route]`` requests of one principal in flight per route, in this
    process (one event loop: no lock). ``enter`` returns the function that gives the slot
    back (idempotent), or None for a route without a limit; over the limit it raises
    ``TooManyInFlight``. Counts of principals with nothing in flight are dropped, so memory
    is bounded by the requests in flight."""

    def __init__(self, limits: dict[str, int]) -> None:
        for route, limit in limits.items():
            if not limit >= 1:
                raise ValueError(f"in_flight_limits[{route}]: must be >= 1")
        self._limits = {normalize_route(r): n for r, n in limits.items()}
        self._names = {normalize_route(r): r for r in limits}   # the template, for labels and messages
        self._held: dict[tuple[str, str], int] = {}
        self._gauges = {n: IN_FLIGHT_HELD.labels(r) for n, r in self._names.items()}

    def limit_for(self, route: str) -> int | None:
        return self._limits.get(normalize_route(route))

    def held(self, principal: Principal, route: str) -> int:
        return self._held.get((principal.id, normalize_route(route)), 0)

    def enter(self, principal: Principal, route: str) -> Callable[[], None] | None:
        route = normalize_route(route)
        limit = self._limits.get(route)
        if limit is None:
            return None
        key = (principal.id, route)
        held = self._held.get(key, 0)
        if held >= limit:
            name = self._names[route]
            IN_FLIGHT_REFUSED.labels(name).inc()
            report_security_event(SecurityEvent("rate_limited", "gateway", "too_many_in_flight",
                                                principal.id, principal.role.value, name))
            raise TooManyInFlight(name, limit)
        self._held[key] = held + 1
        gauge = self._gauges[route]
        gauge.inc()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._held.get(key, 1) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)
            gauge.dec()

        return release


class MemoryBuckets:
    """Token buckets in this process. ``take`` returns 0.0 when allowed, else the
    seconds until a token is available. Idle full buckets are dropped so memory stays
    bounded by the number of recently active (principal, route) pairs."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, per_s: float, burst: int) -> float:
        now = self._clock()
        with self._lock:
            tokens, last = self._state.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + max(0.0, now - last) * per_s)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._state[key] = (tokens, now)
                wait = (1.0 - tokens) / per_s
            if len(self._state) > self._max_entries:
                self._evict(now)
        return wait

    def _evict(self, now: float) -> None:
        # A bucket untouched for an hour is full again for any sane limit; forgetting it
        # changes nothing. If that is not enough (an attack on many keys), drop the oldest half.
        stale = [k for k, (_, last) in self._state.items() if now - last > 3600]
        for k in stale:
            del self._state[k]
        if len(self._state) > self._max_entries:
            for k in sorted(self._state, key=lambda k: self._state[k][1])[: len(self._state) // 2]:
                del self._state[k]


# KEYS[1] bucket; ARGV: per_s, burst. Returns {allowed (0/1), wait seconds as a string}
# (Lua numbers become integers on the way out, so the fraction travels as text).
_TOKEN_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local per_s = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then tokens = burst; last = now end
tokens = math.min(burst, tokens + math.max(0, now - last) * per_s)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / per_s end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / per_s * 1000) + 1000)
return {wait == 0 and 1 or 0, tostring(wait)}
"""


# After a Redis failure, the per-replica buckets answer alone for this long.
REDIS_RETRY_AFTER_S = 1.0


class RedisBuckets:
    """The same buckets in Redis, shared by every replica (async client)."""

    def __init__(self, url: str, prefix: str = "hearth:ratelimit:") -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._redis.register_script(_TOKEN_BUCKET_LUA)
        self._prefix = prefix

    async def take(self, key: str, per_s: float, burst: int) -> float:
        allowed, wait = await self._script(keys=[self._prefix + key], args=[repr(per_s), str(burst)])
        return 0.0 if int(allowed) == 1 else float(wait)

    async def close(self) -> None:
        await self._redis.aclose()


class RateLimiter:
    """Per (principal, route) limits from configuration; ``check`` raises RateLimited."""

    def __init__(self, default: tuple[float, int], per_route: dict[str, tuple[float, int]] | None = None,
                 redis_url: str = "", enabled: bool = True,
                 memory: MemoryBuckets | None = None, in_flight: dict[str, int] | None = None) -> None:
        for name, (per_s, burst) in {"default": default, **(per_route or {})}.items():
            if not (per_s > 0 and burst >= 1):
                raise ValueError(f"rate_limits[{name}]: per_s must be > 0 and burst >= 1")
        self._default = default
        self._per_route = {normalize_route(r): v for r, v in (per_route or {}).items()}
        self._enabled = enabled
        self._memory = memory or MemoryBuckets()
        self._redis = RedisBuckets(redis_url) if redis_url else None
        self._redis_down_logged = 0.0
        self._redis_retry_at = 0.0
        # Per (principal, route) requests in flight on costly routes, in this replica.
        self.in_flight = InFlightLimits(in_flight if in_flight is not None and enabled else {})

    @classmethod
    def from_settings(cls, settings) -> "RateLimiter":
        return cls((settings.rate_limit_default.per_s, settings.rate_limit_default.burst),
                   {r: (s.per_s, s.burst) for r, s in settings.rate_limits.items()},
                   settings.redis_url, settings.rate_limit_enabled,
                   in_flight=in_flight_table(settings.in_flight_limits))

    def limit_for(self, route: str) -> tuple[float, int]:
        return self._per_route.get(normalize_route(route), self._default)

    async def check(self, principal: Principal, route: str) -> None:
        if not self._enabled:
            return
        per_s, burst = self.limit_for(route)
        key = f"{principal.id}|{normalize_route(route)}"
        wait = None
        if self._redis is not None and time.monotonic() >= self._redis_retry_at:
            try:
                wait = await self._redis.take(key, per_s, burst)
            except Exception as exc:  # noqa: BLE001 - any Redis failure: degrade, do not fail
                now = time.monotonic()
                # Not again for a while (the services' cache does the same): with Redis hung
                # rather than down, every call waits out the 0.5 s socket timeout, and until
                # session 20 every API request did — p50 from 34 to 539 ms, throughput down by
                # seven eighths — for as long as Redis hung (tests/e2e/test_gateway_redis_hung.py).
                self._redis_retry_at = now + REDIS_RETRY_AFTER_S
                # A warning, as the services' "redis unreachable, serving from the SQL
                # store": every request is still answered (HearthDependencyDown pages).
                if now - self._redis_down_logged > 60:
                    log.warning("rate-limit store unreachable, using per-replica buckets: %s", exc)
                    self._redis_down_logged = now
        if wait is None:
            wait = self._memory.take(key, per_s, burst)
        if wait > 0:
            report_security_event(SecurityEvent("rate_limited", "gateway", "rate_limited",
                                                principal.id, principal.role.value, route))
            raise RateLimited(route, wait)

    async def admit(self, principal: Principal, route: str) -> Callable[[], None] | None:
        """``check`` (one token), then a slot of the principal's in-flight limit of the
        route: the function that gives it back (call it when the request is done, on every
        path), None when the route has no such limit. Raises RateLimited / TooManyInFlight."""
        await self.check(principal, route)
        return self.in_flight.enter(principal, route)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()


class BodySizeLimit:
    """ASGI middleware: buffer the request body up to ``max_bytes``; beyond it answer
    413 without calling the application (works for chunked bodies too)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, scope, receive, send) -> None:
        response = error_response(413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes",
                                  "body", headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            text = length.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 12 or int(text) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away mid-body: nothing to answer, nothing done
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying_receive(b"".join(chunks), False, receive), send)


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited"}


def rate_limited_response(exc: RateLimited):
    """429 ``rate_limited`` (or ``too_many_in_flight``) with ``Retry-After`` (whole seconds,
    at least 1)."""
    retry = max(1, math.ceil(exc.retry_after_s))
    return error_response(429, getattr(exc, "code_word", "rate_limited"), exc.message, "",
                          headers={"Retry-After": str(retry)})


def install_request_limits(app: FastAPI, settings) -> RateLimiter:
    """Add the body-size middleware and the JSON error handlers for 429 (with
    Retry-After) and for Starlette's own HTTP errors (malformed body, unknown path,
    wrong method), so every error body is ``{"error": {code, field, message}}``.
    Call right after creating the app, before other middleware, so that the
    observability middleware (added later, hence outermost) also sees the 413s."""
    limiter = RateLimiter.from_settings(settings)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    async def on_rate_limited(_request: Request, exc: RateLimited):
        return rate_limited_response(exc)

    async def on_http_error(_request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        field = "body" if exc.status_code == 400 else ""
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, field, headers=getattr(exc, "headers", None))

    app.add_exception_handler(RateLimited, on_rate_limited)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    return limiter
