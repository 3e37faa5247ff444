"""serve(): the one place a Hearth gRPC server is built.

Every service gets the same things: grpc.health.v1 health, server reflection, and
interceptors for tracing, metrics, principal and errors (outermost first, so a span and
its metrics cover the whole call, and errors are mapped before they are counted). On
SIGTERM/SIGINT the health status turns NOT_SERVING first (load balancers stop sending),
the server drains (calls under way finish, calls arriving are refused UNAVAILABLE), and only
then is the gRPC server stopped (``RunningServer.stop``, ``Drain``).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common import audit, client, health_report, identity, permissions, telemetry, text, tls
from services.common.errors import (
    ERROR_CODE_KEY, ERROR_FIELD_KEY, HearthError, InvalidArgument, Unavailable, status_for)

log = logging.getLogger("hearth.server")

# RPCs that need no principal: infrastructure, not data.
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_REFLECTION = "/grpc.reflection."

# Reflection streams are bounded: at most REFLECTION_STREAMS at once per process, each
# cancelled after REFLECTION_STREAM_S (HEARTH_REFLECTION_STREAM_S since session 23). A reflection stream is a bidirectional stream whose
# handler holds one of the service's worker threads while it waits for the client's next
# request, and it needs no principal: until session 21 an anonymous client that opened
# sixteen streams and sent nothing held every worker (HEARTH_MAX_WORKERS) for as long as
# it kept them open — every RPC of the service, the gateway's included, then timed out,
# and the health-only port's liveness check (which needs a free worker) failed. A tool
# (grpcurl list / describe) is done in well under a second.
REFLECTION_STREAMS = 2
REFLECTION_STREAM_S = 10.0


def _bounded_reflection(handler: grpc.RpcMethodHandler, slots: threading.BoundedSemaphore,
                        stream_s: float = REFLECTION_STREAM_S) -> grpc.RpcMethodHandler:
    def serve(request_iterator, context):
        if not slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"at most {REFLECTION_STREAMS} reflection streams at once; retry shortly")
        timer = threading.Timer(stream_s, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            yield from handler.stream_stream(request_iterator, context)
        finally:
            timer.cancel()
            slots.release()

    return grpc.stream_stream_rpc_method_handler(serve, request_deserializer=handler.request_deserializer,
                                                 response_serializer=handler.response_serializer)


# Request streams (IngestEvents, AssignSessions) are bounded per caller the same way: a
# stream whose client has not finished sending holds one of the service's worker threads
# while it waits for the next message, whether the client sends nothing or a message now
# and then. At most STREAMS_PER_CALLER request streams of one principal that wait idle —
# now for longer than STREAM_GRACE_S, or, older than that, for most of their life — may be
# open at once in a process; the newer ones are cancelled. A long busy stream does not
# count, however much its short waits add up to. Until attack25 forty silent IngestEvents streams of one
# service-role principal the gateway's key vouches for (not an API key through the Envoy edge,
# which refuses service-role keys) held every
# clustering worker: every read timed out until the connections aged out (5 min). Time
# spent working on a message does not count, so short streams stay out: the gateway's
# POST /v1/events is a one-message stream that waits only while its bytes arrive, however
# long its 10,000 events take to validate.
STREAMS_PER_CALLER = 4
STREAM_GRACE_S = 1.0


class _OpenStreams:
    """Open request streams: for whom, how long each has waited for its messages, and
    since when it waits now; a watcher thread (started on first use, asleep while none is
    open) cancels each caller's newest streams over the bound among those waiting idle
    (now for longer than the grace, or for most of a life longer than it)."""

    def __init__(self, per_caller: int = STREAMS_PER_CALLER, grace_s: float = STREAM_GRACE_S) -> None:
        self._per_caller, self._grace_s = per_caller, grace_s
        self._lock = threading.Lock()
        # key -> [caller, opened at, seconds waited before the current wait, current wait's start or None, context]
        self._open: dict[object, list] = {}
        self._some_open = threading.Event()
        self._watcher: threading.Thread | None = None

    def messages(self, caller: str, request_iterator: Iterator, context: grpc.ServicerContext) -> Iterator:
        key = object()
        now = time.monotonic()
        stream = [caller, now, 0.0, None, context]
        with self._lock:
            self._open[key] = stream
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="open-streams", daemon=True)
                self._watcher.start()
        self._some_open.set()
        try:
            while True:
                stream[3] = time.monotonic()
                try:
                    message = next(request_iterator)
                except StopIteration:
                    return
                finally:
                    stream[2] += time.monotonic() - stream[3]
                    stream[3] = None
                yield message
        finally:   # the client closed its side, the call ended, or the handler stopped reading
            with self._lock:
                self._open.pop(key, None)

    def _watch(self) -> None:
        while True:
            self._some_open.wait()
            time.sleep(self._grace_s / 2)
            over: list[tuple[str, grpc.ServicerContext]] = []
            with self._lock:
                if not self._open:
                    self._some_open.clear()
                    continue
                waited_long: dict[str, list[tuple[float, grpc.ServicerContext]]] = {}
                now = time.monotonic()
                for caller, opened, waited, waiting_since, context in self._open.values():
                    # Holding a worker idle: waiting now for longer than the grace (silent),
                    # or past the grace for most of its life (a message now and then). Not
                    # the wait summed over its life alone: a long stream busy 3/4 of the time
                    # passed the grace after 4 s and counted as idle (review25).
                    waiting = now - waiting_since if waiting_since is not None else 0.0
                    if waiting > self._grace_s or (now - opened > self._grace_s
                                                   and waited + waiting > (now - opened) / 2):
                        waited_long.setdefault(caller, []).append((opened, context))
                for caller, streams in waited_long.items():
                    if len(streams) > self._per_caller:
                        streams.sort(key=lambda stream: stream[0])
                        over += [(caller, context) for _, context in streams[self._per_caller:]]
            for _, context in over:
                context.cancel()
            for caller in {caller for caller, _ in over}:
                log.warning("cancelled %d request streams of %s (at most %d a caller that have waited "
                            "%.0f s for their messages)", sum(1 for c, _ in over if c == caller),
                            telemetry.pseudonym(caller, cache=True), self._per_caller, self._grace_s)


class _Undecodable:
    """What a request that is not a valid message of its type deserialises to, so that
    the interceptor can answer INVALID_ARGUMENT (after authentication). grpcio itself
    would answer INTERNAL for a deserialiser that raises."""

    def __init__(self, type_name: str, field: str = "", problem: str = "") -> None:
        self.type_name = type_name
        self.field = field or "request"
        self.problem = problem or f"not a valid {type_name} message (malformed or nested too deeply)"


def _tolerant(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None
    message_type = getattr(deserialize, "__self__", None)
    type_name = getattr(message_type, "__name__", "request")

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - DecodeError, too deeply nested, bad UTF-8, ...
            # Text that is not UTF-8 is refused like any other bad text: naming its field.
            field = (text.invalid_utf8_field(message_type.DESCRIPTOR, data)
                     if hasattr(message_type, "DESCRIPTOR") else None)
            if field is not None:
                return _Undecodable(type_name, field, "must be valid UTF-8 text")
            return _Undecodable(type_name)

    return parse


def _checked(request):
    """The request, or InvalidArgument for one that did not parse (field ``request``) or
    whose text breaks the one text rule (``text.check_text_fields``, naming the field);
    for client streams, an iterator doing the same per message as it is read, naming a
    later message's field ``messages[k].<field>`` (the servicers that gather a stream
    validate it whole before they store any of it)."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.problem, request.field)
    if hasattr(request, "DESCRIPTOR") or not hasattr(request, "__next__"):
        if hasattr(request, "DESCRIPTOR"):
            text.check_text_fields(request)
        return request

    def messages():
        for k, message in enumerate(request):
            if isinstance(message, _Undecodable):
                raise InvalidArgument(message.problem, f"messages[{k}].{message.field}" if k else message.field)
            text.check_text_fields(message, f"messages[{k}]." if k else "")
            yield message

    return messages()


class _Unread:
    """A unary request not read yet. Its handler is request-streaming (the same bytes on
    the wire: one message, then the half-close), so grpcio runs it before it asks the
    core for the message, and the message is read (``read``) only once the caller is
    authenticated: an anonymous caller's bytes are never read, whatever their size —
    what the HTTP/2 flow-control window admits before the refusal is all that is
    buffered. A unary handler's message is read whole (up to the receive limit) before
    any interceptor code runs: until session 22, eight anonymous 60 MiB calls took
    attribution from 123 MB to 680 MB RSS (docs/security.md, "Attacker's review
    (session 21)", mended item 7)."""

    __slots__ = ("_messages",)

    def __init__(self, messages: Iterator) -> None:
        self._messages = messages

    def read(self):
        try:
            return next(self._messages)
        except StopIteration:
            raise InvalidArgument("exactly one request message is required", "request") from None
        except grpc.RpcError:
            # The call ended while its message arrived: the caller cancelled it or gave up,
            # or the message was over the receive limit (the core has answered that one
            # RESOURCE_EXHAUSTED itself).
            raise _CallEnded() from None


class _CallEnded(Exception):
    """The call was over before its message was read (counted as CANCELLED)."""


def _wrap(handler: grpc.RpcMethodHandler, around: Callable) -> grpc.RpcMethodHandler:
    """Wrap a handler's behaviour with ``around(behaviour, request_or_iterator, context,
    streaming_response)``; keeps the handler's (de)serialisers and response kind. A unary
    request becomes a request stream whose one message ``around`` reads itself
    (``_Unread``), after authentication."""
    if handler is None:
        return None
    if handler.unary_unary:
        fn, factory, resp_stream = handler.unary_unary, grpc.stream_unary_rpc_method_handler, False
    elif handler.unary_stream:
        fn, factory, resp_stream = handler.unary_stream, grpc.stream_stream_rpc_method_handler, True
    elif handler.stream_unary:
        fn, factory, resp_stream = handler.stream_unary, grpc.stream_unary_rpc_method_handler, False
    else:
        fn, factory, resp_stream = handler.stream_stream, grpc.stream_stream_rpc_method_handler, True

    if handler.request_streaming:
        def behaviour(request, context):
            return around(fn, request, context, resp_stream)
    else:
        def behaviour(request_iterator, context):
            return around(fn, _Unread(request_iterator), context, resp_stream)

    return factory(behaviour, request_deserializer=_tolerant(handler.request_deserializer),
                   response_serializer=handler.response_serializer)


def _read_for_audit(request: _Unread):
    try:
        return request.read()
    except Exception:  # noqa: BLE001 - no message, or the call ended: nothing to name
        return None


# A peer's call that failed this way means the peer is down, hung or stopping.
_PEER_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


# The longest refusal message sent: gRPC refuses trailers over 16 KiB, so a message that
# echoed a long input (a million position_weights, attack31) reached the caller as
# RESOURCE_EXHAUSTED naming no field instead of the refusal naming it.
MAX_STATUS_DETAILS_CHARS = 2000


def _bounded_details(text: str) -> str:
    if len(text) <= MAX_STATUS_DETAILS_CHARS:
        return text
    tail = f"... (cut: {len(text)} characters in all)"
    return text[:MAX_STATUS_DETAILS_CHARS - len(tail)] + tail


def _map_error(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    """Turn an exception into a status on ``context`` (then the caller re-raises via abort)."""
    if isinstance(exc, HearthError):
        context.set_trailing_metadata(((ERROR_CODE_KEY, exc.code), (ERROR_FIELD_KEY, exc.field)))
        context.abort(status_for(exc), _bounded_details(str(exc)))
    code = exc.code() if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)) else None
    if code in _PEER_UNAVAILABLE:
        # A call to a peer that is down, hung or stopping, which the handler did not turn
        # into an error of its own: UNAVAILABLE (the gateway: 503 + Retry-After), one line.
        # Until session 21 it was INTERNAL with a traceback (502 "upstream error"): POST
        # /v1/attribution per person with clustering stopped (tests/e2e/test_routes_with_services_down.py).
        log.warning("%s: a peer this call needs did not answer (%s)", method, code.name)
        context.set_trailing_metadata(((ERROR_CODE_KEY, "unavailable"), (ERROR_FIELD_KEY, "")))
        context.abort(grpc.StatusCode.UNAVAILABLE, "a service this call needs is unavailable")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # A peer refused this service's token (this service's own refusals are
        # HearthErrors, above): the two clocks disagree by more than the tokens' skew
        # (identity.CLOCK_SKEW_S, 30 s) or the mesh's keys do not match. The peer cannot
        # be used, as if it were down: UNAVAILABLE, one line naming the likely cause. Until
        # session 24 it was INTERNAL with a traceback (502 "upstream error") for every
        # request that needed the peer (docs/operations.md, "Clock steps").
        log.warning("%s: a peer refused this service's token (%s): the two clocks disagree by more than %.0f s "
                    "or their service keys do not match", method, exc.details() if callable(
                        getattr(exc, "details", None)) else "", identity.CLOCK_SKEW_S)
        context.set_trailing_metadata(((ERROR_CODE_KEY, "unavailable"), (ERROR_FIELD_KEY, "")))
        context.abort(grpc.StatusCode.UNAVAILABLE, "a service this call needs is unavailable")
    log.error("unexpected error in %s", method, extra={"fields": {"traceback": traceback.format_exc()}})
    context.set_trailing_metadata(((ERROR_CODE_KEY, "internal"), (ERROR_FIELD_KEY, "")))
    context.abort(grpc.StatusCode.INTERNAL, "internal error")


# The stop with a hung peer (RunningServer.stop): how long calls under way get before the
# peers they wait on are asked whether they answer, how long such a health check may take,
# and the gRPC server's own stop once no handler runs.
STOP_PEER_WAIT_S = 2.0
PEER_PROBE_TIMEOUT_S = 1.0
STOP_AFTER_DRAIN_S = 1.0
# The closers (audit flush, outboxes, pools) and the interpreter's exit must be over by
# the grace's end + STOP_CLOSE_MARGIN_S: the pod's margin after its grace is 5 s
# (shutdown.marginSeconds). A closer still running then (stuck on a frozen database: a
# pooled connection's check or a query has no client-side timeout) is left behind on its
# daemon thread and the process exits anyway (``RunningServer.stop``, ``serve``).
STOP_CLOSE_MARGIN_S = 3.0


# The longest a call may go on on a connection past its maximum age (build_server): the
# streamed export's deadline, 30 minutes.
EXPORT_CALL_GRACE_S = 30 * 60


class Drain:
    """Counts the calls under way and, once ``begin()`` is called, refuses new ones.

    Why the server is not simply stopped with a grace period: grpcio's core cancels
    (CANCELLED, at once, whatever the grace) every call that has reached the server but
    is not yet matched to a handler when ``server.stop()`` runs (grpc/grpc#41785: the
    Python server asks the core for one call per method at a time, so on a busy machine
    calls queue there). Those calls never ran, yet their callers saw CANCELLED (the
    gateway answered 499). So on SIGTERM the server keeps accepting and answers every
    call that starts from then on UNAVAILABLE (nothing done, retry elsewhere or later)
    while the calls under way finish, and stops the gRPC server only when none is left:
    the server's loop has then long caught up with the core's queue, so only a call
    arriving in the very instant of the stop can still be cancelled (the gateway answers
    such a call 503, like any call its upstream dropped: gateway/errors.py)."""

    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._running = 0
        self.draining = False

    def enter(self) -> bool:
        """Count a call that starts now; False (and not counted) while draining."""
        with self._idle:
            if self.draining:
                return False
            self._running += 1
            return True

    def exit(self) -> None:
        with self._idle:
            self._running -= 1
            if self._running == 0:
                self._idle.notify_all()

    @property
    def running(self) -> int:
        return self._running

    def begin(self) -> None:
        with self._idle:
            self.draining = True

    def wait_idle(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the calls under way to finish; how many are left."""
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout=max(timeout, 0.0))
            return self._running


class HearthInterceptor(grpc.ServerInterceptor):
    """Tracing -> metrics -> principal -> error mapping, for every RPC kind.

    One class rather than four because the order is part of the contract and the
    streaming cases need the same generator wrapping for each concern."""

    def __init__(self, service: str, drain: Drain | None = None,
                 reflection_stream_s: float = REFLECTION_STREAM_S) -> None:
        self._service = service
        self._reflection_stream_s = reflection_stream_s
        self._tracer = telemetry.tracer("hearth.grpc")
        self._drain = drain or Drain()
        # grpcio calls intercept_service for every RPC. The wrapped handler depends only
        # on the method and the servicer's handler, so it is built once per method (and
        # rebuilt should the registered handler ever change): building it per call
        # (closures, a tolerant deserialiser, a new RpcMethodHandler) cost more than
        # most of what it wraps.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._reflection_slots = threading.BoundedSemaphore(REFLECTION_STREAMS)
        self._open_streams = _OpenStreams()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is not None and method.startswith(_REFLECTION) and handler.stream_stream is not None:
            cached = self._wrapped.get(method)
            if cached is None or cached[0] is not handler:
                cached = self._wrapped[method] = (handler, _bounded_reflection(handler, self._reflection_slots,
                                                                        self._reflection_stream_s))
            return cached[1]
        if method.startswith(_OPEN_SERVICES) or handler is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_method(method, handler)
        if len(self._wrapped) > 4096:   # bounded: unknown methods get no handler above
            self._wrapped.clear()
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_method(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        short = method.rsplit("/", 1)[-1]
        service, tracer, drain = self._service, self._tracer, self._drain
        open_streams = self._open_streams if handler.stream_unary or handler.stream_stream else None
        # The method's metric series, resolved once (``labels()`` takes a lock and
        # builds a key per call); per status code on first use.
        duration = telemetry.RPC_DURATION.labels(service, short)
        requests: dict[grpc.StatusCode, object] = {}
        errors: dict[grpc.StatusCode, object] = {}
        span_attributes = {"rpc.system": "grpc", "rpc.method": short, "rpc.service": method.split("/")[1]}
        span_name = method.lstrip("/")

        def around(fn, request, context: grpc.ServicerContext, resp_stream: bool):
            metadata = context.invocation_metadata()
            parent = telemetry.extract_context(metadata)
            started = time.perf_counter()
            span = tracer.start_span(span_name, context=parent, kind=SpanKind.SERVER,
                                     attributes=span_attributes)
            ctx_token = otel_context.attach(trace.set_span_in_context(span, parent))
            principal_token = None
            deadline_token = None
            principal = None
            counted = False

            def finish(code: grpc.StatusCode) -> None:
                if counted:
                    drain.exit()
                duration.observe(time.perf_counter() - started)
                counter = requests.get(code)
                if counter is None:
                    counter = requests[code] = telemetry.RPC_REQUESTS.labels(service, short, code.name)
                counter.inc()
                if code != grpc.StatusCode.OK:
                    counter = errors.get(code)
                    if counter is None:
                        counter = errors[code] = telemetry.RPC_ERRORS.labels(service, short, code.name)
                    counter.inc()
                    span.set_status(Status(StatusCode.ERROR, code.name))
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                trace_ctx = span.get_span_context()
                # The one place every RPC is audited (event type from audit.RPC_EVENTS).
                audit.record_rpc(service, method, request, principal, metadata, code,
                                 format(trace_ctx.trace_id, "032x") if trace_ctx.is_valid else "")
                span.end()

            def code_of(context) -> grpc.StatusCode:
                code = context.code()
                return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK

            try:
                unread = type(request) is _Unread
                # A unary call is counted once its message is read (below): one whose
                # message never comes (a caller frozen mid-send) must not hold the stop,
                # as it did not when grpcio read the message before the handler ran.
                counted = False if unread else drain.enter()
                if drain.draining if unread else not counted:
                    # Started after SIGTERM: refused before any work, so the caller may
                    # retry it (another replica, or this service once it is back).
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"{service} is shutting down")
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    # Queued behind other work past the caller's deadline: the caller has
                    # given up, so doing the work now only delays the calls still waiting
                    # (an overload would otherwise snowball into minutes of dead work).
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the call started")
                deadline_token = client.set_serving_deadline(remaining, context.is_active)
                # Who is calling, from the metadata and the peer's certificate alone: the
                # message of a unary call is read only after this (_Unread).
                principal = identity.principal_from_metadata(
                    metadata, peer_component=tls.peer_component(context), component=service)
                principal_token = identity.set_current(principal)
                if unread:
                    try:
                        permissions.authorize_rpc(principal, method)
                    except HearthError:
                        # An authenticated caller without the right: its message (within
                        # the receive limit) is read for the audit record's resource, as
                        # before; the answer is the same PERMISSION_DENIED.
                        request = _read_for_audit(request)
                        raise
                    request = request.read()
                    counted = drain.enter()
                    if not counted:
                        context.abort(grpc.StatusCode.UNAVAILABLE, f"{service} is shutting down")
                else:
                    permissions.authorize_rpc(principal, method)
                span.set_attribute("hearth.principal", telemetry.pseudonym(principal.id, cache=True))
                job_id = getattr(request, "job_id", "")
                if job_id and isinstance(job_id, str):
                    # Erase calls of a deletion job (and any job-driven RPC) are findable by job.
                    span.set_attribute("hearth.job_id", job_id)
                request = _checked(request)
                if open_streams is not None:
                    request = open_streams.messages(principal.id, request, context)
                result = fn(request, context)
            except BaseException as exc:  # noqa: BLE001 - every failure must get a status
                if type(request) is _Unread:
                    request = None   # never read: audited without a resource
                try:
                    if isinstance(exc, Exception) and code_of(context) == grpc.StatusCode.OK:
                        if isinstance(exc, _CallEnded):
                            context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request was read")
                        _map_error(exc, context, method)
                    raise
                finally:
                    finish(code_of(context) if code_of(context) != grpc.StatusCode.OK
                           else grpc.StatusCode.UNKNOWN)
                    if principal_token is not None:
                        identity.reset_current(principal_token)
                    if deadline_token is not None:
                        client.reset_serving_deadline(deadline_token)
                    otel_context.detach(ctx_token)
            if not resp_stream:
                finish(code_of(context))
                if principal_token is not None:
                    identity.reset_current(principal_token)
                client.reset_serving_deadline(deadline_token)
                otel_context.detach(ctx_token)
                return result
            # Streaming responses run later, in the iterator; the token attached above
            # belongs to this frame, so detach now and re-attach while iterating.
            identity.reset_current(principal_token)
            client.reset_serving_deadline(deadline_token)
            otel_context.detach(ctx_token)
            return _stream(result, context, span, principal, finish, code_of, method)

        return _wrap(handler, around)


def _stream(result: Iterable, context, span, principal, finish, code_of, method) -> Iterator:
    token = otel_context.attach(trace.set_span_in_context(span))
    p_token = identity.set_current(principal)
    d_token = client.set_serving_deadline(context.time_remaining(), context.is_active)
    try:
        try:
            yield from result
        except Exception as exc:  # noqa: BLE001
            if code_of(context) == grpc.StatusCode.OK:
                try:
                    _map_error(exc, context, method)
                except Exception:
                    pass
            raise
    finally:
        finish(code_of(context))
        identity.reset_current(p_token)
        client.reset_serving_deadline(d_token)
        otel_context.detach(token)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    monitor: health_report.DependencyMonitor | None = None
    drain: Drain = field(default_factory=Drain)
    # The workers that run this server's calls (serve_health_only checks one is free).
    pool: futures.ThreadPoolExecutor | None = None
    # False when stop() left a closer behind (still running at the grace's end + margin).
    closed: bool = True
    # Ask every peer of the process before the closers run (serve(): a service process;
    # a server a test builds leaves the test process's other channels alone).
    check_peers_before_closing: bool = False

    def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, then drain (see ``Drain``): calls under way get up to ``grace``
        seconds to finish, calls starting meanwhile are refused UNAVAILABLE; then the
        gRPC server stops, cancelling whatever still runs when the grace is over.

        A call waiting on a hung peer (SIGSTOPped, a partition) would hold the drain to
        its deadline, and the closers' last sends (the audit sink's flush) would wait on
        it again: every ``STOP_PEER_WAIT_S`` while calls are still running, the peers
        they wait on are asked for their health (``client.abandon_hung_peers``, at most
        ``PEER_PROBE_TIMEOUT_S``), and the calls to a peer that does not answer are
        cancelled (UNAVAILABLE: nothing acknowledged, the caller may retry); before the
        closers run, every peer is asked once the same way. Calls to a peer that answers,
        and local work, keep the whole grace. Found in session 21 (edge21): clustering,
        SIGTERMed while an ingest waited on a SIGSTOPped privacy, took 19.5 s to exit
        (the drain 9.1 s, the audit flush 10 s) — past the pod's 15 s after its preStop."""
        deadline = time.monotonic() + grace
        if self.monitor is not None:
            self.monitor.stop()
        for name in ["", *self.service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.drain.begin()
        running = self.drain.running
        left = self.drain.wait_idle(min(STOP_PEER_WAIT_S, deadline - time.monotonic()))
        while left and deadline - time.monotonic() > PEER_PROBE_TIMEOUT_S:
            client.abandon_hung_peers(PEER_PROBE_TIMEOUT_S)
            left = self.drain.wait_idle(min(STOP_PEER_WAIT_S, deadline - time.monotonic()))
        if left:
            left = self.drain.wait_idle(deadline - time.monotonic())
        if left:
            log.warning("grace of %.1fs over: cancelling %d calls still running", grace, left)
        else:
            log.info("drained: %d calls under way finished in %.2fs", running,
                     grace - (deadline - time.monotonic()))
        # No handler runs any more (or the grace is spent): what the core still holds is a
        # refusal being answered right now, or a call whose caller stopped sending (a
        # frozen peer's), which would otherwise hold the stop for the rest of the grace.
        self.server.stop(min(grace, STOP_AFTER_DRAIN_S) if not left
                         else min(grace, max(deadline - time.monotonic(), 0.5))).wait()
        if self.check_peers_before_closing:
            client.abandon_hung_peers(PEER_PROBE_TIMEOUT_S, busy_only=False)
        self.closed = self._close(deadline + STOP_CLOSE_MARGIN_S)

    def _close(self, close_by: float) -> bool:
        """Run the closers in order on a daemon thread until ``close_by``; False (and the
        closer still running named in the log) when one has not returned by then. Found in
        session 22 (stop22): with PostgreSQL frozen (SIGSTOP), clustering's closers waited
        forever on it — the prediction log's last forward and privacy's audit writer in
        psycopg_pool's ``check_connection`` (``SELECT ''`` on a pooled connection, no
        timeout) — so the process never exited and a pod would be SIGKILLed."""
        current: list[str] = []

        def run() -> None:
            for callback in self.on_stop:
                current[:] = [getattr(callback, "__qualname__", repr(callback))]
                try:
                    callback()
                except Exception:  # noqa: BLE001 - the next closers still run
                    log.exception("closer %s failed", current[0])
            current.clear()

        closing = threading.Thread(target=run, name="stop-closers", daemon=True)
        closing.start()
        closing.join(max(close_by - time.monotonic(), 0.0))
        if closing.is_alive():
            log.warning("closer %s still running %.1fs after the grace: left behind, the process exits "
                        "without the closers after it (what they would save waits for the next start)",
                        current[0] if current else "?", STOP_CLOSE_MARGIN_S)
            return False
        return True


# Request messages only in the identity encoding: a compressed one is refused before it is
# read (tls.IDENTITY_ENCODING_ONLY says why; attack30).
IDENTITY_ENCODING_ONLY = tls.IDENTITY_ENCODING_ONLY


def build_server(service: str, register: Callable[[grpc.Server], Iterable[str]], *,
                 host: str = "127.0.0.1", port: int = 0, max_workers: int = 16,
                 credentials: grpc.ServerCredentials | None = None,
                 reflection_stream_s: float = REFLECTION_STREAM_S) -> RunningServer:
    """Create and start a server: ``register(server)`` adds the servicers and returns
    their full service names (for health and reflection). ``port=0`` picks a free port.
    A reflection stream is cancelled after ``reflection_stream_s``."""
    drain = Drain()
    telemetry.RPC_IN_FLIGHT.labels(service).set_function(lambda: drain.running)
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{service}-rpc")
    server = grpc.server(
        pool,
        interceptors=[HearthInterceptor(service, drain, reflection_stream_s)],
        # Requests up to HEARTH_GRPC_MAX_MESSAGE_BYTES (16 MiB; a larger one is
        # RESOURCE_EXHAUSTED from the core), responses up to HEARTH_GRPC_MAX_RESPONSE_BYTES
        # (64 MiB; a household's export is streamed in chunks of HEARTH_EXPORT_CHUNK_BYTES).
        options=[("grpc.max_receive_message_length", tls.max_message_bytes()),
                 ("grpc.max_send_message_length", tls.response_max_bytes()),
                 ("grpc.so_reuseport", 0),
                 IDENTITY_ENCODING_ONLY,
                 # Connections are recycled so round_robin clients re-resolve and spread
                 # over new replicas (a GOAWAY lets calls in flight finish within the grace).
                 ("grpc.max_connection_age_ms", 5 * 60 * 1000),
                 # A call under way on an aged connection has this long to finish before
                 # it is cut (UNAVAILABLE: "max connection age"). A streamed household
                 # export is paced by the client reading it and runs for minutes: at 30 s
                 # a 300,000-event export was cut part-way (session 26), so the grace is
                 # the export's own deadline (the gateway's EXPORT_TIMEOUT_S). New calls
                 # still go to new connections after 5 minutes.
                 ("grpc.max_connection_age_grace_ms", EXPORT_CALL_GRACE_S * 1000)],
    )
    names = list(register(server))
    health_servicer = health_report.ReportingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, credentials) if credentials
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # Never set NOT_SERVING (not by the dependency monitor, not by the drain): see
    # health_report.LIVENESS_SERVICE.
    health_servicer.set(health_report.LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health_servicer, names, drain=drain, pool=pool)


class _HealthThroughPool(health_pb2_grpc.HealthServicer):
    """The service's own health answers, given only once one of the service's own
    workers has picked up a no-op: a process whose workers are all stuck fails the probe
    on the health-only port as it would on the service port."""

    def __init__(self, health_servicer: health.HealthServicer, pool: futures.Executor | None,
                 timeout_s: float) -> None:
        self._health, self._pool, self._timeout_s = health_servicer, pool, timeout_s

    def Check(self, request, context):
        if self._pool is not None:
            try:
                self._pool.submit(lambda: None).result(timeout=self._timeout_s)
            except (futures.TimeoutError, RuntimeError):   # busy, or shut down
                context.abort(grpc.StatusCode.UNAVAILABLE, "no worker of the service is free")
        return self._health.Check(request, context)


def serve_health_only(health_servicer: health.HealthServicer, host: str, port: int,
                      pool: futures.Executor | None = None, timeout_s: float = 1.5) -> Callable[[], None]:
    """Serve ``health_servicer`` (the service's own: it turns NOT_SERVING on SIGTERM with
    it) in plaintext on ``port``, and nothing else — no Hearth RPC, no reflection — for
    the kubelet's gRPC probes (``HEARTH_HEALTH_PORT``): they cannot present a client
    certificate, so with mutual TLS they could never reach the service port (Kubernetes'
    built-in probes take no TLS parameters). ``Check`` answers only after one of
    ``pool``'s workers (the service's) ran a no-op within ``timeout_s`` (below the
    probes' 2 s), else UNAVAILABLE: a hung process still fails liveness. ``Watch`` is
    not served. Returns the function that stops it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                         options=[IDENTITY_ENCODING_ONLY])
    health_pb2_grpc.add_HealthServicer_to_server(_HealthThroughPool(health_servicer, pool, timeout_s), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"could not bind {host}:{port} (HEARTH_HEALTH_PORT)")
    server.start()
    return lambda: server.stop(0).wait()


def serve(service: str, register: Callable[[grpc.Server], Iterable[str]], settings,
          on_stop: Iterable[Callable[[], None]] = ()) -> None:
    """Run a service until SIGTERM/SIGINT: telemetry, server, graceful stop."""
    telemetry.setup_telemetry(service, settings.trace_export, settings.log_level,
                              settings.resolved_metrics_port, settings.host)
    # Peer authentication is configured before binding: mutual TLS when HEARTH_TLS_* is
    # set (config.configure_process, called by run_service), else signed service tokens.
    material = tls.current_material()
    running = build_server(service, register, host=settings.host,
                           port=settings.resolved_grpc_port, max_workers=settings.max_workers,
                           credentials=tls.server_credentials(material) if material else None,
                           reflection_stream_s=settings.reflection_stream_s)
    if settings.health_port:
        running.on_stop.append(serve_health_only(running.health, settings.host, settings.health_port, running.pool))
    running.on_stop.extend(on_stop)
    running.check_peers_before_closing = True
    # Database, Redis and peers checked every few seconds: health says what is degraded.
    running.monitor = health_report.DependencyMonitor(running.health, running.service_names,
                                                      settings.health_check_interval_s).start()
    stop_requested = threading.Event()

    def request_stop(signum, _frame):
        log.info("signal %s: NOT_SERVING, draining with %.1fs grace", signum, settings.grace_seconds)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("serving", extra={"fields": {"grpc_port": running.port,
                                          "metrics_port": settings.resolved_metrics_port}})
    # Woken every second, not only by the signal: CPython runs a Python signal handler on
    # the main thread, and a SIGTERM the kernel delivers to another thread (one in a C
    # call) does not interrupt the main thread's wait on a lock: it would wait forever.
    while not stop_requested.wait(1.0):
        pass
    exit_by = time.monotonic() + settings.grace_seconds + STOP_CLOSE_MARGIN_S
    running.stop(settings.grace_seconds)
    log.info("stopped" if running.closed else "stopped, closers left behind")
    _exit_by(exit_by, 0 if running.closed else 1)


def _exit_by(exit_by: float, status: int) -> None:
    """After the stop, the interpreter's exit joins every non-daemon thread (an executor's
    worker, psycopg's pool close) and runs the atexit hooks: one stuck on a frozen
    database held a process that had logged "stopped" (session 22, stop22). A daemon
    timer ends the process at ``exit_by`` (at least 1 s from now) if it is still here;
    a closer left behind (``status`` 1) ends it at once."""
    def force() -> None:
        held = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        log.warning("exit still held after the stop (non-daemon threads: %s): exiting now", ", ".join(held) or "none")
        _hard_exit(1)

    if status:
        _hard_exit(status)
    timer = threading.Timer(max(exit_by - time.monotonic(), 1.0), force)
    timer.name, timer.daemon = "exit-watchdog", True
    timer.start()


def _hard_exit(status: int) -> None:
    for stream in [*(getattr(h, "flush", None) for h in logging.getLogger().handlers),
                   sys.stdout.flush, sys.stderr.flush]:
        try:
            if stream is not None:
                stream()
        except Exception:  # noqa: BLE001
            pass
    os._exit(status)


def register_peer_checks(name: str, settings) -> list[str]:
    """A health check per peer service ``name`` calls (config.PEER_CALLS), none for the
    others: until session 32 every service probed all three, and where the chart's
    NetworkPolicies are enforced a peer it never calls refuses its connections, so
    clustering reported "peer attribution" failing (attribution and feedback each other)
    for good. Returns the checks' names."""
    from services.common import config

    names = []
    for peer in sorted(config.PEER_CALLS.get(name, ())):
        names.append(f"peer {peer}")
        health_report.register(names[-1], health_report.peer_probe(getattr(settings, f"{peer}_addr")))
    return names


# Below this much free space on the data directory's volume, a start-up the storage refused
# is called a full disk (SQLite needs room for a 32 KiB -shm and the WAL's first frames).
FULL_VOLUME_BYTES = 1 << 20


@contextlib.contextmanager
def stop_if_storage_refuses(name: str, data_dir: str, what: str) -> Iterator[None]:
    """Around a service's wiring: its SQLite database (or a file of its data directory)
    refusing a write stops the process in one line — the database, SQLite's own words and
    the volume's free space — instead of a traceback. On a full volume the first write of
    start-up (``PRAGMA journal_mode=WAL`` creating the ``-shm``) says only "disk I/O
    error", which reads as a failing device (ops33: every process of `make run` restarted
    on its full data directory). A wrong statement is a bug and keeps its traceback."""
    import sqlite3

    from services.common.storage.sql import SQLITE_UNAVAILABLE_CODES

    try:
        yield
    except (sqlite3.OperationalError, Unavailable, OSError) as exc:
        if isinstance(exc, sqlite3.OperationalError) and (
                getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in SQLITE_UNAVAILABLE_CODES:
            raise
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS,
                                                          errno.EIO):
            raise
        free, _size = telemetry.volume_bytes(data_dir)
        where = exc.filename if isinstance(exc, OSError) and exc.filename else what
        full = " — the volume is full: free space on it, then start again" if free < FULL_VOLUME_BYTES else ""
        raise SystemExit(f"{name} cannot start: {where} refused a write ({exc}); the volume of {data_dir} has "
                         f"{free:.0f} bytes free{full}") from None


def run_service(name: str, build: Callable, settings_cls: type | None = None) -> None:
    """Entry point shared by every ``python -m services.<name>``: load and validate the
    configuration once (``settings_cls``, default the service's own settings class,
    ``config.service_settings_class``; an unknown or bad HEARTH_* variable stops the process
    naming it), let ``build(settings)`` wire the service (returning
    ``[(add_servicer_fn, servicer, full_service_name)], [closers]``), then serve()."""
    from services.common import config

    config.keep_files_private()
    settings = config.load(settings_cls or config.service_settings_class(name), service_name=name)
    # Service tokens, mutual TLS, channel options and log pseudonyms from these settings:
    # nothing else in the process reads the environment.
    config.configure_process(settings)
    # Logging (JSON), tracing and /metrics before build(): what build() logs (generated
    # development keys, a worker resuming jobs) is JSON too. serve() finds it done.
    telemetry.setup_telemetry(name, settings.trace_export, settings.log_level,
                              settings.resolved_metrics_port, settings.host)
    config.warn_if_shared(settings.data_dir)
    telemetry.watch_data_dir(settings.data_dir, settings.data_dir_size_limit)
    with stop_if_storage_refuses(name, settings.data_dir, f"its database {os.path.join(settings.data_dir, name)}.db"
                                 if settings.storage == "sqlite" else "its storage"):
        servicers, closers = build(settings)
    register_peer_checks(name, settings)
    if not audit.installed():
        # Every service audits through privacy's AppendAudit (the privacy service
        # installs its local, durable sink in build()). Flushed after the server stops.
        with stop_if_storage_refuses(name, settings.data_dir, f"its audit outbox in {settings.data_dir}"):
            sink = audit.sink_for_service(name, settings.privacy_addr, settings.peer_timeout_s,
                                          outbox_dir=settings.data_dir,
                                          reserve_bytes=int(settings.audit_reserve_mb * 2**20))
        audit.install(sink)
        closers = [sink.close, *closers]

    def register(server: grpc.Server) -> list[str]:
        for add, servicer, _ in servicers:
            add(servicer, server)
        return [full_name for _, _, full_name in servicers]

    # Everything start-up made (modules, classes, the numerical libraries' objects) lives
    # as long as the process: moved out of the cyclic collector's reach, neither the full
    # collections while serving nor the interpreter's exit walk it again. The exit used to
    # spend ~0.5 CPU-s in collections over scikit-learn/SciPy's objects (seconds of a
    # mesh's stop on a loaded machine); after gc.freeze() about 0.05 s.
    gc.collect()
    gc.freeze()
    serve(name, register, settings, on_stop=closers)
