"""Outbound gRPC from one service to another: deadline, principal and trace context on
every call; retries only for calls the caller marks idempotent."""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

import grpc
from opentelemetry.trace import SpanKind

from services.common import identity, telemetry, tls
from services.common.errors import DeadlineExceeded

T = TypeVar("T")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
log = logging.getLogger("hearth.client")

# The deadline (time.monotonic()) of the RPC this thread is serving, set by the server's
# interceptor: a call to a peer made while serving it never outlives it (gRPC Python does
# not propagate deadlines by itself). Before, every peer call got its full default
# (HEARTH_PEER_TIMEOUT_S, 5 s, and idempotent ones up to 3 attempts) even when the
# caller had given up long before, so an overload snowballed into dead work downstream.
_serving_deadline: contextvars.ContextVar[tuple[float | None, Callable[[], bool] | None] | None] = \
    contextvars.ContextVar("serving_deadline", default=None)


def set_serving_deadline(remaining_s: float | None,
                         is_active: Callable[[], bool] | None = None) -> contextvars.Token:
    """Record the deadline of the RPC being served (``context.time_remaining()``) and,
    optionally, whether its caller still waits (``context.is_active``: False once the call
    was cancelled, e.g. by the gateway when its HTTP client disconnected)."""
    deadline = None if remaining_s is None else time.monotonic() + remaining_s
    return _serving_deadline.set((deadline, is_active))


def reset_serving_deadline(token: contextvars.Token) -> None:
    _serving_deadline.reset(token)


def serving_time_left() -> float | None:
    """Seconds left of the RPC being served (at least 1 ms), or None outside one or when
    its caller set no deadline (gRPC then reports one centuries away)."""
    deadline = (_serving_deadline.get() or (None, None))[0]
    if deadline is None or deadline - time.monotonic() > NO_DEADLINE_S:
        return None
    return max(deadline - time.monotonic(), 0.001)


def check_serving_deadline() -> None:
    """Raise ``DeadlineExceeded`` when the deadline of the RPC being served has passed,
    or its caller cancelled it.

    gRPC Python cannot interrupt a handler: past its deadline the caller has its
    DEADLINE_EXCEEDED, but the handler's thread runs on to the end of the work. Long
    computations call this between steps (attribution's bootstrap replicates, removal
    solves, order candidates, per-person reports), so dead work stops within one step
    instead of holding a worker thread and a CPU for as long as it takes (session 21: one
    analyst request, 2,000 bootstrap replicates of an order-4 chain, ran on for minutes
    after its 504; sixteen such requests held every attribution worker). A cancelled call
    (the gateway cancels a costly read whose HTTP client disconnected, session 22) stops
    the same way. Outside an RPC, or for a caller that set no deadline, it does nothing."""
    deadline, is_active = _serving_deadline.get() or (None, None)
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the caller's deadline passed; the work was stopped")
    if is_active is not None and not is_active():
        raise DeadlineExceeded("the caller cancelled the call; the work was stopped")


# A deadline further away than this is no deadline (a call without one).
NO_DEADLINE_S = 86400.0


def bounded_timeout(timeout_s: float) -> float:
    """``timeout_s``, cut to what is left of the RPC being served (if any)."""
    left = serving_time_left()
    return timeout_s if left is None else min(timeout_s, left)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class PeerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
                      grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds a client span, the trace context, the acting principal and a default deadline.

    The principal's token names its audience: ``audience`` (the component this channel
    reaches) when given, else the service of the method's package
    (``/hearth.<service>.v1.X/Method``). A method of ``hearth.common.v1`` (DataHolder,
    served by several components) needs an explicit ``audience``."""

    def __init__(self, acting_as: Callable[[], identity.Principal], timeout_s: float,
                 audience: str | None = None, link: PeerLink | None = None) -> None:
        self._acting_as = acting_as
        self._timeout = timeout_s
        self._audience = audience
        self._tracer = telemetry.tracer("hearth.grpc.client")
        self._link = link

    def _call(self, continuation, details, request, streaming: bool = False):
        link = self._link
        if link is not None and not link.enter():
            raise PeerAbandoned(link.address)
        try:
            with telemetry.safe_span(self._tracer, details.method.lstrip("/"), kind=SpanKind.CLIENT):
                metadata = [m for m in (details.metadata or []) if m[0] not in
                            (identity.PRINCIPAL_KEY, identity.ROLE_KEY, identity.TOKEN_KEY)]
                audience = self._audience or audience_of_method(details.method)
                metadata = telemetry.inject_context(metadata + self._acting_as().metadata(audience))
                new_details = _ClientCallDetails(
                    details.method,
                    bounded_timeout(details.timeout if details.timeout is not None else self._timeout),
                    metadata, details.credentials, details.wait_for_ready, details.compression)
                response = continuation(new_details, request)
                if isinstance(response, grpc.Future) and not streaming:
                    # Surface errors inside the span. Not for a response stream: its result()
                    # waits for the whole stream, which nobody reads meanwhile (the caller
                    # iterates it; its errors surface there).
                    response.result()
                return response
        except grpc.RpcError as exc:
            if link is not None and link.abandoned and exc.code() == grpc.StatusCode.CANCELLED:
                # Cancelled by abandon_hung_peers (this process is stopping and the peer
                # did not answer): UNAVAILABLE, like any peer that cannot be reached.
                raise PeerAbandoned(link.address) from None
            raise
        finally:
            if link is not None:
                link.exit()

    intercept_unary_unary = _call
    intercept_stream_unary = _call

    def intercept_unary_stream(self, continuation, details, request):
        return self._call(continuation, details, request, streaming=True)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        # A response stream too: until session 30 this was ``_call`` without
        # ``streaming``, whose result() waited for the whole stream nobody was reading, so
        # every AssignSessions over a peer channel hung until its deadline (checks30).
        return self._call(continuation, details, request_iterator, streaming=True)


_METHOD_PACKAGE = re.compile(r"^/hearth\.([a-z]+)\.v1\.[A-Za-z]+/[A-Za-z]+$")


def audience_of_method(method: str | bytes) -> str:
    """The component a gRPC method belongs to (``/hearth.clustering.v1.X/Y`` ->
    "clustering"); ValueError for a method of ``hearth.common.v1``, which several
    components serve, or of no Hearth package."""
    if isinstance(method, bytes):
        method = method.decode()
    match = _METHOD_PACKAGE.match(method or "")
    if match is None or match.group(1) == "common":
        raise ValueError(f"{method}: no single component serves it; give the channel an audience")
    return match.group(1)


def _acting_principal(service: str) -> Callable[[], identity.Principal]:
    """On behalf of the caller when inside an RPC (so the audit trail keeps the human),
    else as the service itself."""
    fallback = identity.service_principal(service)

    def acting() -> identity.Principal:
        try:
            return identity.current_principal()
        except Exception:  # noqa: BLE001 - no RPC in progress
            return fallback

    return acting


class PeerAbandoned(grpc.RpcError):
    """UNAVAILABLE: a call to a peer this stopping process gave up on (``abandon_hung_peers``)."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return f"peer {self.address} did not answer while this process was stopping: call cancelled"

    def trailing_metadata(self):
        return ()

    def initial_metadata(self):
        return ()

    def __str__(self) -> str:
        return self.details()


class PeerLink:
    """One peer channel as the stop sees it: its address, the raw channel (closing it
    cancels every call on it), the calls in flight, and whether it was abandoned (every
    call from then on fails at once with ``PeerAbandoned``)."""

    def __init__(self, address: str, channel: grpc.Channel) -> None:
        from grpc_health.v1 import health_pb2

        self.address = address
        self.channel = channel
        self.abandoned = False
        # Made now, while the channel is open, and not registered: registering a method
        # at stop time on a channel another thread had closed crashed the process
        # (a segfault in grpcio's _get_registered_call_handle); a closed channel's call
        # raises ValueError instead.
        self.health_check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self._in_flight = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.abandoned:
                return False
            self._in_flight += 1
            return True

    def exit(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
        self.channel.close()


# Every peer channel of this process (peer_channel), for the stop: weak, so a closed
# Peer that nothing holds any more drops out.
_LINKS: weakref.WeakSet[PeerLink] = weakref.WeakSet()
_LINKS_LOCK = threading.Lock()


def _answers(link: PeerLink, timeout_s: float) -> bool:
    """False when the peer at ``link.address`` takes a gRPC health check and does not
    answer it within ``timeout_s``; any answer (NOT_SERVING too: a draining peer still
    finishes its calls) or a refused connection is not a hung peer."""
    from grpc_health.v1 import health_pb2

    try:
        link.health_check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as exc:
        # UNAVAILABLE: nothing listens there (calls fail at once anyway); only a peer that
        # takes the call and never answers is hung.
        return exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
    except ValueError:   # the channel was closed meanwhile
        return True
    return True


def abandon_hung_peers(timeout_s: float = 1.0, busy_only: bool = True) -> list[str]:
    """For a stopping process: ask each peer (its address once; ``busy_only``: only the
    peers this process has calls in flight to) for its gRPC health, all at once, for at
    most ``timeout_s``; every peer that does not answer (SIGSTOPped, a partition: its
    connection open, nothing answering) is abandoned — its channels are closed, so the
    calls waiting on it end at once as UNAVAILABLE (``PeerAbandoned``) instead of at
    their deadlines, and later calls fail the same way without waiting. Calls to a peer
    that answers are left to finish. Returns the abandoned addresses."""
    with _LINKS_LOCK:
        links = [link for link in _LINKS if not link.abandoned]
    by_address: dict[str, list[PeerLink]] = {}
    for link in links:
        by_address.setdefault(link.address, []).append(link)
    if busy_only:
        by_address = {a: ls for a, ls in by_address.items() if any(link.in_flight for link in ls)}
    if not by_address:
        return []
    with futures.ThreadPoolExecutor(len(by_address), thread_name_prefix="peer-probe") as pool:
        answered = dict(zip(by_address, pool.map(
            lambda links: _answers(links[0], timeout_s), by_address.values())))
    hung = [address for address, ok in answered.items() if not ok]
    for address in hung:
        calls = sum(link.in_flight for link in by_address[address])
        log.warning("peer %s did not answer in %.1fs while stopping: cancelling its %d calls in flight",
                    address, timeout_s, calls)
        for link in by_address[address]:
            link.abandon()
    return hung


def peer_channel(address: str, calling_service: str, timeout_s: float = 5.0,
                 audience: str | None = None) -> grpc.Channel:
    # Mutual TLS when HEARTH_TLS_* is configured; the signed principal rides in metadata
    # either way (PeerInterceptor -> Principal.metadata(audience)).
    channel = tls.channel(address, options=tls.channel_options())
    link = PeerLink(address, channel)
    with _LINKS_LOCK:   # as long as the interceptor (the returned channel) holds it
        _LINKS.add(link)
    return grpc.intercept_channel(channel, PeerInterceptor(_acting_principal(calling_service), timeout_s,
                                                           audience, link))


class Peer:
    """One outbound connection to another Hearth service, in the one style every
    service's client uses: a channel (mutual TLS when configured; ``PeerInterceptor``
    adds the client span, trace context, principal metadata and a default deadline),
    one generated stub, and ``call`` which runs an RPC with a deadline as the calling
    service's principal (``svc:<calling_service>``) or, with ``on_behalf_of_caller``,
    as the principal of the RPC being served (so the permission matrix judges the human
    behind it). Only calls marked ``idempotent`` are retried. ``audience``: the component
    at ``address``, needed only for a stub of ``hearth.common.v1`` (DataHolder); else it
    is the stub's own service."""

    def __init__(self, address: str, calling_service: str, stub_class: type, timeout_s: float = 5.0,
                 audience: str | None = None) -> None:
        self.channel = peer_channel(address, calling_service, timeout_s, audience)
        self.stub = stub_class(self.channel)
        self.timeout_s = timeout_s
        self._me = identity.service_principal(calling_service)

    def call(self, method: str, request, *, idempotent: bool = False, attempts: int = 3,
             timeout_s: float | None = None, on_behalf_of_caller: bool = False):
        rpc = getattr(self.stub, method)
        timeout = self.timeout_s if timeout_s is None else timeout_s

        def once():
            return rpc(request, timeout=timeout)

        def run():
            return call_idempotent(once, attempts) if idempotent else once()

        if on_behalf_of_caller:
            return run()
        with identity.acting_as(self._me):
            return run()

    def close(self) -> None:
        self.channel.close()


def call_idempotent(fn: Callable[[], T], attempts: int = 3, backoff_s: float = 0.1) -> T:
    """Retry an idempotent call on UNAVAILABLE / DEADLINE_EXCEEDED with exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except grpc.RpcError as exc:
            if exc.code() not in _RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(backoff_s * (2 ** attempt))
    raise AssertionError("unreachable")


class ProcessStub:
    """Every gRPC service one process serves, as one stub looked up by method name
    (e.g. the privacy process: Deletion, Consent, AuditLog and Keys). Method names are
    unique across the services of one process; a clash is refused here."""

    def __init__(self, channel, stub_classes) -> None:
        self._methods: dict[str, Callable] = {}
        for stub_class in stub_classes:
            stub = stub_class(channel)
            for name, method in vars(stub).items():
                if name in self._methods:
                    raise ValueError(f"{name}: served by two services of one process")
                self._methods[name] = method

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_methods"][name]
        except KeyError:
            raise AttributeError(name) from None


def stub_classes(service: str) -> list[type]:
    """The stub classes of every service in ``hearth.<service>.v1`` (its own API)."""
    import importlib

    pb2 = importlib.import_module(f"hearth.{service}.v1.{service}_pb2")
    pb2_grpc = importlib.import_module(f"hearth.{service}.v1.{service}_pb2_grpc")
    return [getattr(pb2_grpc, f"{name}Stub") for name in pb2.DESCRIPTOR.services_by_name]


# A batch RPC an older peer does not know (privacy's GetConsents and GetDataKeys, session
# 28): UNIMPLEMENTED from a release before it, PERMISSION_DENIED from one that lists it but
# refuses this caller. After such a refusal the caller asks one item a call (that release's
# way) and tries the batch again only after this long (docs/operations.md, "Rolling upgrades").
BATCH_RECHECK_S = 300.0
_OLDER_PEER_CODES = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)


class BatchCall:
    """``call(send)``: ``send()``'s answer, or None when the peer refused the batch RPC as
    an older release does (``_OLDER_PEER_CODES``) — then, for ``recheck_s``, None at once
    without asking. Any other error is raised. One instance per peer and RPC (consent's
    GetConsents, field_crypto's GetDataKeys: until session 35 each restated this rule)."""

    def __init__(self, recheck_s: float = BATCH_RECHECK_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.recheck_s = recheck_s
        self._clock = clock
        self._refused_at: float | None = None

    def call(self, send: Callable[[], T]) -> T | None:
        if self._refused_at is not None and self._clock() - self._refused_at < self.recheck_s:
            return None
        try:
            return send()
        except grpc.RpcError as exc:
            if exc.code() in _OLDER_PEER_CODES:
                self._refused_at = self._clock()
                return None
            raise
