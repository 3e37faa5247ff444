"""The HTTP/JSON gateway (FastAPI): authenticate, validate, one gRPC call, JSON out."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from gateway import models
from gateway.admission import AdmissionControl, BodyDeadline, Gate, route_table
from gateway.auth import Authenticator
from gateway.docs_pages import install_docs_pages
from gateway.clients import ServiceClients
from gateway.config import GatewaySettings
from gateway.errors import RETRY_AFTER_S, declare_errors, error_response, from_hearth_error, from_rpc_error
from gateway.lean import FastLane, fast_lane_routes
from gateway.ratelimit import RateLimited, install_request_limits, rate_limited_response
from gateway.routes import attribution as attribution_routes
from gateway.routes import audit as audit_routes
from gateway.routes import clustering as clustering_routes
from gateway.routes import edge as edge_routes
from gateway.routes import feedback as feedback_routes
from gateway.routes import privacy as privacy_routes
from services.common import audit, client, identity, telemetry
from services.common.errors import HearthError
from services.common.identity import Principal
from services.common.ids import ID_PATTERN, ID_RULE
from services.common.text import MULTILINE_TEXT_PATTERN, TEXT_PATTERN, check_text
from services.common.permissions import authorize_route
from services.common.server import PEER_PROBE_TIMEOUT_S, stop_if_storage_refuses

log = logging.getLogger("hearth.gateway")
ACCESS_LOG = logging.getLogger("hearth.access")

HTTP_REQUESTS = Counter("hearth_http_requests_total", "HTTP requests", ["route", "method", "status"])
CANCELLED_ON_DISCONNECT = Counter("hearth_gateway_cancelled_on_disconnect_total",
                                  "Costly read requests cancelled because their client disconnected first")
HTTP_DURATION = Histogram("hearth_http_request_duration_seconds", "HTTP request time", ["route", "method"],
                          buckets=telemetry.LATENCY_BUCKETS)

# Where CredentialsBeforeBody leaves the (route, principal) it authenticated and authorised,
# so that the route's access() dependency does not do it again.
_CHECKED = "hearth.credentials_checked"


class CredentialsBeforeBody:
    """ASGI middleware, outside the fast lane: a request to a protected route that carries
    a body (POST, PUT, PATCH) is authenticated, authorised and charged to its rate limit
    from its headers *before* anything parses the body; a refusal is the route's usual
    401/403/429 (reported, audited and counted the same way), the body never parsed.

    Why (session 21): the JSON parse, the duplicate-key check and the schema validation
    ran before the route's dependencies, so an anonymous client's 8 MiB body of
    ``{"events": [{}, {}, ...]}`` (2.6 million objects) cost the gateway's event loop 1-3 s
    of CPU and ~200 MB before its 401 — every other request waited behind it, and no
    rate limit applies to a caller without credentials; and a principal over its rate
    limit had each body parsed before its 429.

    A costly route (``RateLimiter.in_flight``: attribution, the exports, key rotation; GET
    ones too) also takes one of the principal's in-flight slots of the route here, or is
    answered 429 ``too_many_in_flight``; the slot is held until the request is done and
    given back on every path (answer, error, cancellation). A read-only one is cancelled
    when its client disconnects (``run_until_disconnect``: the gRPC call is cancelled and
    the service stops the work), so the slot is not held for dead work (session 22)."""

    def __init__(self, app, routes, protected: set[str], authenticator: Authenticator, limiter) -> None:
        self.app = app
        self.routes = routes            # (path regex, route) of every service route
        self.protected = protected      # "METHOD /template" of the routes behind access()
        self.authenticator = authenticator
        self.limiter = limiter

        # The GET routes with an in-flight bound (only those are handled here among GETs:
        # the hot household reads skip the look-up).
        self._bounded_gets = [(p, r) for p, r in routes if "GET" in getattr(r, "methods", ())
                              and limiter.in_flight.limit_for(f"GET {r.path}") is not None]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "GET"):
            path = scope["path"]
            for pattern, route in (self._bounded_gets if scope["method"] == "GET" else self.routes):
                if pattern.match(path):
                    key = f"{scope['method']} {route.path}"
                    if key in self.protected:
                        try:
                            who = self.authenticator.authenticate(Headers(scope=scope), key)
                            authorize_route(who, key)
                            release = await self.limiter.admit(who, key)
                        except HearthError as refusal:
                            scope["route"] = route   # labelled by its template, as when routed
                            answer = (rate_limited_response(refusal) if isinstance(refusal, RateLimited)
                                      else from_hearth_error(refusal))
                            await answer(scope, receive, send)
                            return
                        scope[_CHECKED] = (key, who)
                        if release is not None:
                            async def send_freeing(message) -> None:
                                # Free the slot as the answer completes, before the client can
                                # see it: its next request on a keep-alive connection is handled
                                # while this one's task is still unwinding, and got a 429.
                                if message["type"] == "http.response.body" and not message.get("more_body", False):
                                    release()
                                await send(message)

                            try:
                                if key in READ_ONLY_COSTLY:
                                    await run_until_disconnect(self.app, scope, receive, send_freeing)
                                else:   # a write is never cut half way: its slot waits for its end
                                    await self.app(scope, receive, send_freeing)
                            finally:
                                release()
                            return
                    break
        await self.app(scope, receive, send)


# Costly routes that change nothing: cancelled when their client goes away.
READ_ONLY_COSTLY = frozenset({"POST /v1/attribution", "GET /v1/household/{account_id}/export",
                              "GET /v1/audit/export", "GET /v1/household/{account_id}", "GET /v1/calibration",
                              "GET /v1/audit"})


async def run_until_disconnect(app, scope, receive, send) -> None:
    """Run the ASGI ``app`` for this request, cancelling it if the client disconnects
    before the response is complete. uvicorn does not cancel a request's task when its
    client goes away: the handler (and the gRPC call it awaits, and the service's work)
    ran on to the end or to the deadline. Here one task reads ``receive`` for the app
    (the body, already received by ``BodyDeadline``) and then waits for the disconnect."""
    messages: asyncio.Queue = asyncio.Queue()
    completed = False

    async def pump() -> None:
        while True:
            message = await receive()
            messages.put_nowait(message)
            if message["type"] == "http.disconnect":
                return

    async def app_send(message) -> None:
        nonlocal completed
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            completed = True
        await send(message)

    handler = asyncio.ensure_future(app(scope, messages.get, app_send))
    listener = asyncio.ensure_future(pump())
    try:
        await asyncio.wait((handler, listener), return_when=asyncio.FIRST_COMPLETED)
        if not handler.done() and not completed:
            handler.cancel()    # the client is gone: nobody reads the answer
            CANCELLED_ON_DISCONNECT.inc()
        try:
            await handler
        except asyncio.CancelledError:
            if not handler.cancelled() or asyncio.current_task().cancelling():
                raise
    finally:
        listener.cancel()
        if not handler.done():   # this request itself was cancelled (server shutdown, a timeout)
            handler.cancel()
            await asyncio.wait((handler,))   # the upstream call cancelled before the slot is given back


# The methods the API answers (and HEAD / OPTIONS / PATCH / DELETE, which a client may
# send): their own label; any other method the HTTP parser knows (~35: PROPFIND, MKCOL,
# M-SEARCH, ...) is "other". Until attack31 each was a label value of its own, so an
# anonymous caller sending every one to every route (each a 405 or 404) made ~18,000
# series per gateway replica (35 methods x 28 routes x a counter and a histogram).
_METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in _METHOD_LABELS else "other"


def _route_label(scope, status: int) -> str:
    """The route template of a request (never the raw path: it holds account ids).
    FastAPI's own pages (/openapi.json, /docs, /redoc) are plain Starlette routes that
    leave no ``route`` in the scope; they have fixed paths, so they are named as such
    (the liveness and startup probes ask for /openapi.json, and were counted as
    "unmatched" 200s); anything else without a route is "unmatched"."""
    route = scope.get("route")
    if route is not None:
        return route.path
    app = scope.get("app")
    path = scope.get("path")
    if status != 404 and app is not None and path and path in {
            getattr(app, "openapi_url", None), getattr(app, "docs_url", None), getattr(app, "redoc_url", None),
            getattr(app, "swagger_ui_oauth2_redirect_url", None)}:
        return path
    return "unmatched"


def client_trace_link(headers: dict[str, str]) -> list[Link]:
    """The client's ``traceparent`` as a span link, never as the parent.

    The gateway is where callers from outside meet the mesh, so every request starts a
    trace of its own here (Hearth's trace id, returned in ``x-trace-id``). Until session 19
    it continued the client's ``traceparent``, so a client chose the trace id stored in
    every audit record of its request (the tamper-evident log, which is never rewritten):
    it could collide with or pose as another request's trace, or put 16 bytes of its own
    choosing into a log that outlives erasure; its sampled flag also decided whether the
    mesh traced the request (forcing every request into the collector, or hiding its own).
    A link keeps the client's trace joinable (trace UIs follow links) without letting it
    name ours. ``tracestate`` and ``baggage`` from the client are dropped: they would ride
    on every call into the mesh.
    """
    client = trace.get_current_span(propagate.extract(headers)).get_span_context()
    if not client.is_valid:
        return []
    return [Link(client, {"hearth.link": "client_traceparent"})]


class ObserveMiddleware:
    """Outermost: a server span per request (a new trace; the caller's ``traceparent`` is a
    link, ``client_trace_link``), the Content-Length limit (413), a JSON 500 for anything
    unhandled, Prometheus metrics and the ``x-trace-id`` response header.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
    runs every request through an extra task group and memory streams, which the
    profile showed as the largest single cost of the gateway (docs/benchmarks.md)."""

    def __init__(self, app, tracer, max_body_bytes: int, access_log: bool = True) -> None:
        self.app = app
        self.tracer = tracer
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        # Metric children by label values: prometheus_client's labels() validates and locks
        # on every call; the set of (route template, method, status) is small and fixed.
        self._requests: dict[tuple[str, str, int], object] = {}
        self._durations: dict[tuple[str, str], object] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = method_label(scope["method"])
        links = client_trace_link(headers) if "traceparent" in headers else None
        started = time.perf_counter()
        # Named after the route template once routed, never the raw path: paths carry
        # account ids, and trace files are not rewritten when a household is erased.
        # A root span: the client's trace is a link, never the parent (client_trace_link).
        root = otel_context.Context()
        span = self.tracer.start_span(method, context=root, kind=SpanKind.SERVER, links=links,
                                      attributes={"http.method": method})
        token = otel_context.attach(trace.set_span_in_context(span, root))
        trace_header = format(span.get_span_context().trace_id, "032x").encode()
        status = 500
        response_started = False

        async def send_observed(message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-trace-id", trace_header)]}
            await send(message)

        try:
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await error_response(413, "payload_too_large",
                                     f"request body exceeds {self.max_body_bytes} bytes")(scope, receive, send_observed)
            else:
                await self.app(scope, receive, send_observed)
        except Exception:  # noqa: BLE001 - last resort: log once, answer a JSON 500
            log.exception("unhandled error")
            if not response_started:
                await error_response(500, "internal", "internal error")(scope, receive, send_observed)
        finally:
            otel_context.detach(token)
            label = _route_label(scope, status)
            span.update_name(f"{method} {label}")
            span.set_attributes({"http.route": label, "http.status_code": status})
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
            elapsed = time.perf_counter() - started
            counter = self._requests.get((label, method, status))
            if counter is None:
                counter = self._requests[(label, method, status)] = HTTP_REQUESTS.labels(label, method, str(status))
            counter.inc()
            histogram = self._durations.get((label, method))
            if histogram is None:
                histogram = self._durations[(label, method)] = HTTP_DURATION.labels(label, method)
            histogram.observe(elapsed)
            if self.access_log and ACCESS_LOG.isEnabledFor(logging.INFO):
                ACCESS_LOG.info("%s %s %d", method, label, status, extra={"fields": {
                    "method": method, "route": label, "status": status,
                    "duration_ms": round(elapsed * 1000, 3), "trace_id": trace_header.decode()}})



def _rule_in_words(error: dict) -> str:
    """The 422's message for one pydantic error: an id or a text field refused by its
    pattern gets the rule in words, as a gRPC caller reads it (services/common/ids.py,
    text.py), not the regular expression (until session 32: "String should match pattern
    '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'", and for text the refused characters raw)."""
    message = error.get("msg", "invalid")
    if error.get("type") == "value_error":
        # pydantic prefixes a validator's own words with "Value error, ": noise to a caller.
        return message.removeprefix("Value error, ")
    if error.get("type") != "string_pattern_mismatch":
        return message
    pattern = (error.get("ctx") or {}).get("pattern")
    if pattern == ID_PATTERN:
        return ID_RULE
    if pattern in (TEXT_PATTERN, MULTILINE_TEXT_PATTERN) and isinstance(error.get("input"), str):
        try:
            check_text(error["input"], "", max_chars=len(error["input"]), multiline=pattern == MULTILINE_TEXT_PATTERN)
        except HearthError as refusal:
            return refusal.message
    return message

def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    authenticator = Authenticator.from_settings(settings)
    clients = ServiceClients(
        {"clustering": settings.clustering_addr, "attribution": settings.attribution_addr,
         "privacy": settings.privacy_addr, "feedback": settings.feedback_addr},
        settings.rpc_timeout_s, settings.health_timeout_s)
    tracer = telemetry.tracer("hearth.gateway")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await clients.start()
        # Refused requests (401/403 decided here, never reaching a service) go to the
        # audit log; every RPC is audited by the services themselves.
        with stop_if_storage_refuses("gateway", settings.data_dir, f"its audit outbox in {settings.data_dir}"):
            audit_sink = audit.sink_for_service("gateway", settings.privacy_addr, settings.rpc_timeout_s,
                                                outbox_dir=settings.data_dir,
                                                reserve_bytes=int(settings.audit_reserve_mb * 2**20))
        audit.install(audit_sink)
        remove_listener = identity.add_security_listener(audit.security_listener("gateway"))
        yield
        await clients.close()
        await limiter.close()
        remove_listener()
        audit.install(None)
        # The audit sink sends to privacy: one that does not answer (SIGSTOPped) would hold
        # the flush, then the join, 3 s each. Asked first (at most 1 s), a hung privacy's
        # channel is closed, the flush fails at once and the records wait in the disk
        # outbox for the next start, as at a service's stop (server.RunningServer.stop).
        await asyncio.to_thread(client.abandon_hung_peers, PEER_PROBE_TIMEOUT_S, False)
        audit_sink.close(timeout_s=3.0)
        # Last: every request's span (and the audit sink's last calls) has ended. No exit
        # hook runs after this (telemetry.flush_traces says why).
        # At most 2 s: with the 3 s audit flush above it stays inside the chart's margin
        # (terminationGracePeriodSeconds = preStop 5 + grace 10 + margin 5).
        telemetry.flush_traces(2.0)

    # FastAPI's native telemetry is off: it would open a second, unconnected root span
    # (and its own metrics) around the `observe` middleware below, which is the one
    # server span per request (a new trace, linking the caller's traceparent). (Its span would
    # also record the raw path, ``url.path``, and paths carry account ids that trace
    # files must not keep: docs/privacy.md, "What erased means".)
    # /docs and /redoc are gateway/docs_pages.py's: their scripts pinned with integrity hashes.
    app = FastAPI(title="Hearth gateway", version="1.0.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False,
                             "operation_spans": False, "auto_configure": False},
                  description="HTTP/JSON front of the Hearth mesh. Authenticate with the "
                              "`X-API-Key` header or `Authorization: Bearer <JWT>`.")
    app.state.clients = clients
    install_docs_pages(app)
    # Body-size limit and rate limiter; installed before the observe middleware below so
    # that one stays outermost and counts the 413s too.
    limiter = install_request_limits(app, settings)

    protected_routes: set[str] = set()  # "METHOD /path/template" of every route behind access()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        # FastAPI parses and validates the body before it runs the route's dependencies,
        # so without this an anonymous caller's malformed body would get a 422 (telling
        # them about the API) where a well-formed one gets 401/403. Credentials first:
        # the refusal is the same 401/403 as always, and is audited the same way.
        route = request.scope.get("route")
        key = f"{request.method} {getattr(route, 'path', '')}"
        if key in protected_routes:
            try:
                authorize_route(authenticator.authenticate(request.headers, key), key)
            except HearthError as refusal:
                return from_hearth_error(refusal)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            # loc is ("body", character offset): the offset is not a field, the body is.
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            reason = (first.get("ctx") or {}).get("error", "")
            return error_response(422, "invalid_argument",
                                  f"body is not valid JSON{where}" + (f": {reason}" if reason else ""), "body")
        parts = [p for p in loc if p not in ("body", "path", "query")]
        field = "body" if loc[:1] == ("body",) and not parts else ""   # the body as a whole (missing, not an object)
        for p in parts:
            field += f"[{p}]" if isinstance(p, int) else (f".{p}" if field else str(p))
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, HearthError) and cause.field:
            # A model's validator raised the mesh's own error (ErasureScope): it names the
            # field within the model — `scope.device_id`, not `scope` with "device_id: ..."
            # in the message (until session 32).
            field = f"{field}.{cause.field}" if field and field != "body" else cause.field
            return error_response(422, "invalid_argument", cause.message, field)
        return error_response(422, "invalid_argument", _rule_in_words(first), field)

    @app.exception_handler(HearthError)
    async def on_hearth_error(_request: Request, exc: HearthError):
        return from_hearth_error(exc)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def on_rpc_error(_request: Request, exc: grpc.aio.AioRpcError):
        return from_rpc_error(exc)

    def access(route: str):
        """Dependency for a route: authenticate the caller, then check the permission
        matrix for ``route`` ("METHOD /path/template")."""
        protected_routes.add(route)

        async def dependency(request: Request) -> Principal:
            checked = request.scope.get(_CHECKED)
            if checked is not None and checked[0] == route:
                return checked[1]   # CredentialsBeforeBody did all three, before the body was parsed
            who = authenticator.authenticate(request.headers, route)
            authorize_route(who, route)
            await limiter.check(who, route)
            return who

        return dependency

    # One route module per backing service: the admission limit of a route is its service's.
    routes_by_service: dict[str, list] = {}
    for module, service in ((clustering_routes, "clustering"), (attribution_routes, "attribution"),
                            (feedback_routes, "feedback"), (audit_routes, "privacy"), (privacy_routes, "privacy")):
        options = {"prediction_wait_s": settings.feedback_prediction_wait_s} if module is feedback_routes else {}
        router = module.router(clients, access, **options)
        routes_by_service.setdefault(service, []).extend(router.routes)
        app.include_router(router)
    if settings.edge_authorizer_port:
        # Served on its own listener only (edge_routes.ListenerSplit, added last below).
        app.include_router(edge_routes.router(authenticator, limiter))
    # Inside the observe middleware, outside the body-size one: complete JSON bodies for the
    # lean routes skip FastAPI's stack (gateway/lean.py); the routers above are included
    # without prefix or router-level dependencies, so each route is exactly as declared.
    app.add_middleware(FastLane, routes=fast_lane_routes(r for rs in routes_by_service.values() for r in rs),
                       exception_handlers=app.exception_handlers, max_body_bytes=settings.max_body_bytes,
                       overrides_provider=app)
    # Outside the fast lane and FastAPI's body parsing: credentials before the body.
    app.add_middleware(CredentialsBeforeBody, authenticator=authenticator, protected=protected_routes, limiter=limiter,
                       routes=[(r.path_regex, r) for rs in routes_by_service.values() for r in rs
                               if getattr(r, "path_regex", None) is not None])
    app.add_middleware(ObserveMiddleware, tracer=tracer, max_body_bytes=settings.max_body_bytes,
                       access_log=settings.access_log)
    if settings.admission_enabled:
        # Outermost: a refusal under overload must cost next to nothing (no span, no log
        # line, no body read); it is still counted in hearth_http_requests_total.
        gates = {s: Gate(s, spec.max_in_flight, spec.max_queue, spec.queue_timeout_s)
                 for s in routes_by_service for spec in [settings.admission_for(s)]}
        app.add_middleware(AdmissionControl, gates=gates, routes=route_table(routes_by_service),
                           count_refusal=lambda route, method: HTTP_REQUESTS.labels(route, method_label(method), "503").inc())
    # Outside admission: the body is received (within body_timeout_s) before a slot is taken.
    table = route_table(routes_by_service)

    def count_body_timeout(scope) -> None:
        template = next((t for pattern, _, t in table if pattern.match(scope["path"])), "unmatched")
        HTTP_REQUESTS.labels(template, method_label(scope["method"]), "408").inc()

    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s, max_body_bytes=settings.max_body_bytes,
                       count_timeout=count_body_timeout)
    if settings.edge_authorizer_port:
        # Outermost: the public port never serves the edge authorizer, its port nothing else.
        app.add_middleware(edge_routes.ListenerSplit, authorizer_port=settings.edge_authorizer_port)

    @app.get("/health", response_model=models.HealthOut, responses={503: {"model": models.HealthOut}})
    async def health():
        # Readiness of the gateway: it serves while any service does (each route answers
        # 503 + Retry-After while its own service is down), so one service's outage does
        # not take the whole HTTP API out of the Kubernetes Service. Open to anyone (no
        # credentials, public port): the reasons name failing checks only, never the
        # services' own reason text with internal addresses (gateway/clients.public_reason).
        statuses, reasons = await clients.health()
        serving = [s == "SERVING" for s in statuses.values()]
        status = ("SERVING" if all(serving) and not reasons else "DEGRADED" if any(serving) else "NOT_SERVING")
        body = models.HealthOut(status=status, services=statuses, reasons=reasons)
        return JSONResponse(body.model_dump(), status_code=503 if status == "NOT_SERVING" else 200,
                            headers={"Retry-After": str(RETRY_AFTER_S)} if status == "NOT_SERVING" else None)

    # /openapi.json declares every error status each route can answer, with the shared
    # error body, from the one table in gateway/errors.py (not per route by hand: until
    # session 19 the routes listed theirs and none declared 408, 431, 502 or 504).
    openapi_of_routes = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            declare_errors(openapi_of_routes(), protected_routes)
        return app.openapi_schema

    app.openapi = openapi

    if not settings.metrics_port:
        # One-port mode only; normally python -m gateway serves /metrics on its own port.
        @app.get("/metrics", include_in_schema=False)
        async def metrics():
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
