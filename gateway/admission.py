"""Admission control at the gateway: a bound on the requests in flight to each upstream
service, so that past capacity the gateway answers a fast 503 + ``Retry-After`` instead of
queueing work it cannot finish.

Why: without a bound every request the gateway accepts is parsed, authenticated and sent
on, however long the queue behind it already is. Past saturation each request then waits
longer than its client's timeout, the services still do the work of requests nobody waits
for, and goodput collapses (docs/benchmarks.md measured 100 req/s falling to 10-25 req/s at
1,000 req/s offered). With a bound the mesh keeps working at its capacity on the requests it
admitted, and the rest are refused in well under a millisecond of gateway time.

Per upstream (clustering, attribution, privacy, feedback), because one slow service must
not use up the gateway's capacity for the others: a request whose route is backed by
service *s* takes one of ``max_in_flight`` slots of *s* for its whole handling (body
parsing, authentication, the RPC, the response). When none is free it waits in a FIFO queue
of at most ``max_queue`` requests for at most ``queue_timeout_s``; a full queue or an
expired wait is answered at once with 503 ``overloaded`` and ``Retry-After``. The queue
absorbs bursts shorter than the timeout; the timeout bounds the latency it adds.

Routes that no service backs (``/health``, ``/metrics``, ``/openapi.json``) are never
limited: probes must keep answering under overload.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter, Gauge

from gateway.transport import replaying_receive

ADMISSION_REJECTED = Counter("hearth_gateway_admission_rejected_total",
                             "Requests refused with 503 by the gateway's admission limit",
                             ["upstream", "reason"])
ADMISSION_IN_FLIGHT = Gauge("hearth_gateway_in_flight", "Requests holding an admission slot", ["upstream"])
ADMISSION_QUEUED = Gauge("hearth_gateway_admission_queued", "Requests waiting for an admission slot",
                         ["upstream"])

# What a refused client should wait before retrying (seconds): the queue drains in about
# queue_timeout_s, so a second is enough to find free slots without synchronising retries.
OVERLOAD_RETRY_AFTER_S = 1


class Gate:
    """``max_in_flight`` slots and a FIFO queue of at most ``max_queue`` waiters, each
    waiting at most ``queue_timeout_s``. Single event loop: no locking needed."""

    def __init__(self, name: str, max_in_flight: int, max_queue: int, queue_timeout_s: float) -> None:
        if max_in_flight < 1 or max_queue < 0 or queue_timeout_s < 0:
            raise ValueError("max_in_flight >= 1, max_queue >= 0, queue_timeout_s >= 0")
        self.name = name
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._in_flight_gauge = ADMISSION_IN_FLIGHT.labels(name)
        self._queued_gauge = ADMISSION_QUEUED.labels(name)

    async def acquire(self) -> str:
        """"" when admitted (call ``release`` afterwards), else why not: "queue_full" or
        "queue_timeout"."""
        if self.in_flight < self.max_in_flight and not self._waiters:
            self._take()
            return ""
        if len(self._waiters) >= self.max_queue:
            return "queue_full"
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._queued_gauge.set(len(self._waiters))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
            return ""   # release() handed its slot to this waiter
        except (asyncio.TimeoutError, asyncio.CancelledError):
            if waiter.done() and not waiter.cancelled():
                # The slot arrived just as the wait ended: give it on, never leak it.
                self.release()
            else:
                waiter.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
            self._queued_gauge.set(len(self._waiters))
            if asyncio.current_task().cancelling():
                raise
            return "queue_timeout"

    def _take(self) -> None:
        self.in_flight += 1
        self._in_flight_gauge.set(self.in_flight)

    def release(self) -> None:
        # Hand the slot straight to the oldest live waiter (in_flight unchanged), so a
        # newcomer cannot overtake the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._queued_gauge.set(len(self._waiters))
                return
        self.in_flight -= 1
        self._in_flight_gauge.set(self.in_flight)


class AdmissionControl:
    """ASGI middleware, outermost: find the upstream of the request's route (``routes``:
    (compiled path regex, service, route template) of the routes each service backs), hold
    one of its slots while the request is handled, or answer 503 ``overloaded`` +
    ``Retry-After`` without calling the app.

    A refusal must cost far less than serving, or the gateway's own CPU becomes the
    collapse: it is a pre-encoded response sent straight to the server, counted in
    ``hearth_http_requests_total`` (through ``count_refusal(route, method)``) and
    ``hearth_gateway_admission_rejected_total``, with no span, access-log line or body read."""

    def __init__(self, app, gates: dict[str, Gate], routes: list[tuple[re.Pattern, str, str]],
                 count_refusal: Callable[[str, str], None] | None = None) -> None:
        self.app = app
        self.gates = gates
        self.routes = routes
        self.count_refusal = count_refusal
        # Paths without parameters by dict look-up (the hot routes); the rest by regex, in order.
        self._static = {}
        for pattern, service, template in routes:
            if "{" not in template:
                self._static.setdefault(template, (service, template))
        self._body = json.dumps({"error": {"code": "overloaded", "field": "", "message":
                                           f"at capacity; retry after {OVERLOAD_RETRY_AFTER_S} s"}}).encode()
        self._start = {"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode()),
            (b"retry-after", str(OVERLOAD_RETRY_AFTER_S).encode())]}

    def upstream_of(self, path: str) -> tuple[str, str] | None:
        """(service, route template) of the route matching ``path``, None if unbacked."""
        found = self._static.get(path)
        if found is not None:
            return found
        for pattern, service, template in self.routes:
            if pattern.match(path):
                return service, template
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self.upstream_of(scope["path"])
        gate = self.gates.get(found[0]) if found else None
        if gate is None:
            await self.app(scope, receive, send)
            return
        refused = await gate.acquire()
        if refused:
            ADMISSION_REJECTED.labels(found[0], refused).inc()
            if self.count_refusal is not None:
                self.count_refusal(found[1], scope["method"])
            await send(self._start)
            await send({"type": "http.response.body", "body": self._body})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.release()


def route_table(routers_by_service: dict[str, list]) -> list[tuple[re.Pattern, str, str]]:
    """(path regex, service, route template) for every route of every service's routers
    (Starlette's own compiled ``path_regex``, so matching agrees with the router)."""
    table = []
    for service, routes in routers_by_service.items():
        for route in routes:
            regex = getattr(route, "path_regex", None)
            if regex is not None:
                table.append((regex, service, route.path))
    return table


class BodyDeadline:
    """ASGI middleware, outside admission control: receive a request's whole body
    *before* the request takes an admission slot, within ``timeout_s``; a body not
    complete by then is answered ``408 request_timeout`` and the connection closed.

    Why: admission holds a slot of the route's service for the whole handling of a
    request. Had the body been read inside that slot, forty anonymous connections that
    each send headers and one byte of a ``POST /v1/events`` body (no credentials needed:
    a body is read before authentication) held every clustering slot and queue place
    for as long as they kept the connections open, and every caller of every
    clustering route got 503 (session 18, docs/security.md). Now a slow body costs
    its sender a connection, for at most ``timeout_s``, and nobody else anything.

    Buffers at most ``max_body_bytes`` (+ one chunk): past that the request goes on
    unread and the body-size limit inside answers 413 as before. Requests without a
    body (no Content-Length or a zero one, no Transfer-Encoding) pass straight through."""

    def __init__(self, app, timeout_s: float, max_body_bytes: int,
                 count_timeout: Callable[[dict], None] | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s: must be > 0")
        self.app = app
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.count_timeout = count_timeout
        self._body = json.dumps({"error": {"code": "request_timeout", "field": "body", "message":
                                           f"request body not received within {timeout_s:g} s"}}).encode()
        self._start = {"type": "http.response.start", "status": 408, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode()),
            (b"connection", b"close")]}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        has_body = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                has_body = value.strip() not in (b"0", b"")
            elif name == b"transfer-encoding":
                has_body = True
                break
        if not has_body:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more and size <= self.max_body_bytes:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return   # the client went away mid-body: nothing to answer, nothing done
                    body = message.get("body", b"")
                    chunks.append(body)
                    size += len(body)
                    more = message.get("more_body", False)
        except TimeoutError:
            if self.count_timeout is not None:
                self.count_timeout(scope)
            await send(self._start)
            await send({"type": "http.response.body", "body": self._body})
            return
        await self.app(scope, replaying_receive(b"".join(chunks), more, receive), send)
