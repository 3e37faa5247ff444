"""The gateway's one gRPC client module: it owns the channels (grpc.aio) and every
outbound call goes through ``call`` with a deadline, the principal and the trace
context in metadata.

Why not ``services.common.client.Peer``: Peer is the services' synchronous client, which
acts as the calling service (or the principal of the RPC being served, taken from a
thread-local). The gateway runs on asyncio and every call carries the HTTP caller's own
principal, passed explicitly; it shares the rest with Peer (``ProcessStub`` and
``stub_classes`` for the stubs, ``tls`` for the channels, ``telemetry`` for the context),
and never retries: a retry is the HTTP client's decision (503 + Retry-After)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind

from services.common import telemetry, tls
from services.common.client import ProcessStub, stub_classes
from services.common.health_report import FAILING_KEY, REASON_KEY
from services.common.identity import Principal

SERVICES = ("clustering", "attribution", "privacy", "feedback")
log = logging.getLogger("hearth.gateway.health")
stop_log = logging.getLogger("hearth.gateway")


def _abandoned_error(service: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=f"{service} did not answer while the gateway stopped")


def public_reason(trailing: dict[str, str]) -> str:
    """What the gateway's public ``/health`` says of a degraded service: the failing
    checks' names ("peer privacy: failing"), never the service's own reason text, which
    names internal addresses ("10.0.3.7:50053 unreachable") and driver messages (a
    database host and port). ``/health`` answers anyone: the detail stays in the logs
    and in the services' gRPC health, which only the mesh can reach."""
    failing = trailing.get(FAILING_KEY, "")
    if failing:
        return "; ".join(f"{name}: failing" for name in failing.split("; ") if name)
    return "degraded (see the service's log)" if trailing.get(REASON_KEY) else ""


class ServiceClients:
    def __init__(self, addresses: dict[str, str], timeout_s: float, health_timeout_s: float) -> None:
        self._addresses = addresses
        self._timeout = timeout_s
        self._health_timeout = health_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, Any] = {}
        self._health: dict[str, health_pb2_grpc.HealthStub] = {}
        self._last_detail: dict[str, str] = {}   # per service: the reason last logged
        self._tracer = telemetry.tracer("hearth.gateway.client")
        # The calls in flight per service, and those a stopping gateway abandoned because
        # their service did not answer (abandon_hung): they end UNAVAILABLE (503).
        self._in_flight: dict[str, set] = {name: set() for name in SERVICES}
        self._abandoned: set = set()
        self._hung: set[str] = set()

    async def start(self) -> None:
        for name in SERVICES:
            # Mutual TLS when HEARTH_TLS_* is configured, plaintext otherwise (tls.aio_channel).
            channel = tls.aio_channel(self._addresses[name], options=tls.channel_options())
            self._channels[name] = channel
            # One stub per process; privacy serves four services (Deletion, Consent, AuditLog, Keys).
            self.stubs[name] = ProcessStub(channel, stub_classes(name))
            self._health[name] = health_pb2_grpc.HealthStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def call(self, service: str, method: str, request, principal: Principal,
                   timeout_s: float | None = None):
        """Unary call with deadline, principal and trace context. Raises AioRpcError."""
        rpc: Callable[..., Awaitable] = getattr(self.stubs[service], method)
        with telemetry.safe_span(self._tracer, f"{service}/{method}", kind=SpanKind.CLIENT):
            metadata = telemetry.inject_context(principal.metadata(service))
            return await self._tracked(service, rpc(request, timeout=timeout_s or self._timeout, metadata=metadata))

    async def stream_unary(self, service: str, method: str, requests, principal: Principal,
                           timeout_s: float | None = None):
        rpc = getattr(self.stubs[service], method)
        with telemetry.safe_span(self._tracer, f"{service}/{method}", kind=SpanKind.CLIENT):
            metadata = telemetry.inject_context(principal.metadata(service))
            return await self._tracked(service, rpc(iter(requests), timeout=timeout_s or self._timeout,
                                                    metadata=metadata))

    def unary_stream(self, service: str, method: str, request, principal: Principal, timeout_s: float | None = None):
        """A server-streaming call with deadline, principal and trace context, returned
        unread: the caller reads it (``await call.read()``) and cancels it if it stops
        early. Known as in flight to ``service`` until it ends (``abandon_hung``)."""
        if service in self._hung:
            raise _abandoned_error(service)
        rpc = getattr(self.stubs[service], method)
        metadata = telemetry.inject_context(principal.metadata(service))
        call = rpc(request, timeout=timeout_s or self._timeout, metadata=metadata)
        in_flight = self._in_flight[service]
        in_flight.add(call)
        call.add_done_callback(in_flight.discard)
        return call

    async def _tracked(self, service: str, call):
        """Await ``call``, known as in flight to ``service`` meanwhile; one that
        ``abandon_hung`` cancelled raises UNAVAILABLE (a 503 with Retry-After)."""
        if service in self._hung:
            call.cancel()
            raise _abandoned_error(service)
        in_flight = self._in_flight[service]
        in_flight.add(call)
        try:
            return await call
        except asyncio.CancelledError:
            if call not in self._abandoned:
                raise
            raise _abandoned_error(service) from None
        finally:
            in_flight.discard(call)
            self._abandoned.discard(call)

    async def abandon_hung(self, timeout_s: float) -> list[str]:
        """For a stopping gateway (gateway.__main__.GatewayServer): ask each service that
        has calls in flight for its health, all at once, for at most ``timeout_s``; the
        calls to one that does not answer (SIGSTOPped, a partition) are cancelled, their
        requests answered 503 (nothing was acknowledged: the client retries elsewhere),
        and later calls to it fail the same way at once. A service that answers (even
        NOT_SERVING, while it drains) keeps its calls. Returns the abandoned services;
        the same as the services' own stop does with a hung peer
        (``services.common.client.abandon_hung_peers``)."""
        busy = [name for name, calls in self._in_flight.items() if calls and name not in self._hung]
        if not busy:
            return []
        answered = await asyncio.gather(*(self._answers(name, timeout_s) for name in busy))
        hung = [name for name, ok in zip(busy, answered) if not ok]
        for name in hung:
            calls = list(self._in_flight[name])
            stop_log.warning("%s did not answer in %.1fs while the gateway stops: cancelling its %d calls in "
                             "flight (503)", name, timeout_s, len(calls))
            self._hung.add(name)
            for call in calls:
                self._abandoned.add(call)
                call.cancel()
        return hung

    async def _answers(self, name: str, timeout_s: float) -> bool:
        try:
            await self._health[name].Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def serving(self, name: str) -> bool:
        """Whether service ``name`` answers its health check SERVING (health deadline)."""
        try:
            response = await self._health[name].Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=self._health_timeout)
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def health(self) -> tuple[dict[str, str], dict[str, str]]:
        """(status per service, reasons per degraded service), asked concurrently."""
        async def one(name: str, stub) -> tuple[str, str, str]:
            try:
                call = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self._health_timeout)
                response = await call
                trailing = {k: v for k, v in (await call.trailing_metadata() or ())}
                detail = trailing.get(REASON_KEY, "")
                if detail and self._last_detail.get(name) != detail:
                    log.warning("health: %s degraded: %s", name, detail)   # operators: the full reason
                self._last_detail[name] = detail
                return (name, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status),
                        public_reason(trailing))
            except grpc.aio.AioRpcError as exc:
                return name, f"UNREACHABLE ({exc.code().name})", f"unreachable: {exc.code().name}"

        results = await asyncio.gather(*(one(n, s) for n, s in self._health.items()))
        return {n: s for n, s, _ in results}, {n: r for n, _, r in results if r}
