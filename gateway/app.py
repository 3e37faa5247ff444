"""The HTTP/JSON gateway (FastAPI): authenticate, validate, one gRPC call, JSON out."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from datetime import timezone

import grpc
import numpy as np
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from gateway import models
from gateway.auth import Authenticator, load_api_keys
from gateway.clients import ServiceClients
from gateway.config import GatewaySettings
from gateway.errors import error_response, from_hearth_error, from_rpc_error
from hearth.clustering.v1 import clustering_pb2 as cpb
from services.common import telemetry
from services.common.errors import HearthError
from services.common.identity import Principal
from services.common.permissions import authorize_route
from services.common.pbutil import float_to_ts, name_to_enum

log = logging.getLogger("hearth.gateway")

HTTP_REQUESTS = Counter("hearth_http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_DURATION = Histogram("hearth_http_request_duration_seconds", "HTTP request time", ["route", "method"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

ERROR_RESPONSES = {
    401: {"model": models.ErrorOut, "description": "missing or invalid credentials"},
    413: {"model": models.ErrorOut, "description": "request body too large"},
    422: {"model": models.ErrorOut, "description": "invalid input; `error.field` names the field"},
    503: {"model": models.ErrorOut, "description": "a service is unavailable"},
}


def _ts_seconds(dt) -> float:
    return dt.timestamp()


def _event_to_pb(e: models.EventIn) -> cpb.ViewingEvent:
    msg = cpb.ViewingEvent(
        event_id=e.event_id, account_id=e.account_id, device_id=e.device_id,
        device_type=name_to_enum(e.device_type, cpb.DeviceType.DESCRIPTOR, "DEVICE_TYPE_"),
        ts=float_to_ts(_ts_seconds(e.ts)),
        kind=name_to_enum(e.kind, cpb.EventKind.DESCRIPTOR, "EVENT_KIND_"),
        title_id=e.title_id or "", genres=e.genres, duration_s=e.duration_s, vpn=e.vpn,
        maturity=name_to_enum(e.maturity, cpb.Maturity.DESCRIPTOR, "MATURITY_") if e.maturity else 0)
    if e.series_id is not None:
        msg.series_id = e.series_id
    if e.country is not None:
        msg.country = e.country
    if e.profile_hint is not None:
        msg.profile_hint = e.profile_hint
    return msg


def _device_name(value: int) -> str:
    return cpb.DeviceType.Name(value).removeprefix("DEVICE_TYPE_").lower()


def _household_to_json(r: cpb.GetHouseholdResponse) -> models.HouseholdOut:
    def dt(ts):
        return ts.ToDatetime(tzinfo=timezone.utc)

    return models.HouseholdOut(
        account_id=r.account_id,
        devices=[models.DeviceOut(device_id=d.device_id, device_type=_device_name(d.device_type),
                                  session_count=d.session_count, last_seen=dt(d.last_seen))
                 for d in r.devices],
        sessions=[models.SessionOut(
            session_id=s.session_id, device_id=s.device_id, start=dt(s.start), end=dt(s.end),
            event_count=s.event_count, watch_seconds=s.watch_seconds, closed=s.closed,
            feature_schema_version=s.feature_schema_version,
            feature_vector=(np.frombuffer(s.feature_vector, dtype="<f4").round(6).tolist()
                            if s.feature_vector else None),
            person_id=s.person_id or None) for s in r.sessions],
        persons=[models.PersonOut(person_id=p.person_id, session_count=p.session_count,
                                  peak_hours=list(p.peak_hours), peak_days=list(p.peak_days),
                                  devices=list(p.devices), top_genres=list(p.top_genres),
                                  kids_share=p.kids_share) for p in r.persons],
        drift_events=[models.DriftOut(drift_type=d.drift_type, severity=d.severity, statistic=d.statistic,
                                      detected_at=dt(d.detected_at), refit_triggered=d.refit_triggered)
                      for d in r.drift_events],
        model_version=r.model_version, model_variant=r.model_variant)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    authenticator = Authenticator(load_api_keys(settings.api_keys_file))
    clients = ServiceClients(
        {"clustering": settings.clustering_addr, "attribution": settings.attribution_addr,
         "privacy": settings.privacy_addr, "feedback": settings.feedback_addr},
        settings.rpc_timeout_s, settings.health_timeout_s)
    tracer = telemetry.tracer("hearth.gateway")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await clients.start()
        yield
        await clients.close()

    app = FastAPI(title="Hearth gateway", version="1.0.0", lifespan=lifespan,
                  description="HTTP/JSON front of the Hearth mesh. Authenticate with the "
                              "`X-API-Key` header.")
    app.state.clients = clients

    @app.middleware("http")
    async def observe(request: Request, call_next):
        # A server span per request, continuing the caller's trace if it sent one.
        parent = propagate.extract(dict(request.headers))
        started = time.perf_counter()
        span = tracer.start_span(f"{request.method} {request.url.path}", context=parent,
                                 kind=SpanKind.SERVER,
                                 attributes={"http.method": request.method, "http.target": request.url.path})
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
                response = error_response(413, "payload_too_large",
                                          f"request body exceeds {settings.max_body_bytes} bytes")
            else:
                response = await call_next(request)
        except Exception:  # noqa: BLE001 - last resort: log once, answer a JSON 500
            log.exception("unhandled error")
            response = error_response(500, "internal", "internal error")
        finally:
            otel_context.detach(token)
        route = request.scope.get("route")
        label = getattr(route, "path", "unmatched")
        span.set_attribute("http.status_code", response.status_code)
        if response.status_code >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        HTTP_REQUESTS.labels(label, request.method, str(response.status_code)).inc()
        HTTP_DURATION.labels(label, request.method).observe(time.perf_counter() - started)
        trace_id = format(span.get_span_context().trace_id, "032x")
        response.headers["x-trace-id"] = trace_id
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        parts = [p for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        field = ""
        for p in parts:
            field += f"[{p}]" if isinstance(p, int) else (f".{p}" if field else str(p))
        return error_response(422, "invalid_argument", first.get("msg", "invalid"), field)

    @app.exception_handler(HearthError)
    async def on_hearth_error(_request: Request, exc: HearthError):
        return from_hearth_error(exc)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def on_rpc_error(_request: Request, exc: grpc.aio.AioRpcError):
        return from_rpc_error(exc)

    def access(route: str):
        """Dependency for a route: authenticate the caller, then check the permission
        matrix for ``route`` ("METHOD /path/template")."""

        async def dependency(request: Request) -> Principal:
            who = authenticator.authenticate(request.headers)
            authorize_route(who, route)
            return who

        return dependency

    @app.post("/v1/events", response_model=models.IngestOut, responses=ERROR_RESPONSES,
              summary="Ingest a batch of viewing events (idempotent by event_id)")
    async def post_events(body: models.EventsIn, who: Principal = Depends(access("POST /v1/events"))):
        request = cpb.IngestEventsRequest(events=[_event_to_pb(e) for e in body.events])
        r = await clients.stream_unary("clustering", "IngestEvents", [request], who)
        return models.IngestOut(accepted=r.accepted, duplicates=r.duplicates,
                                rejected_late=r.rejected_late, sessions_touched=r.sessions_touched)

    @app.get("/v1/household/{account_id}", response_model=models.HouseholdOut,
             responses={**ERROR_RESPONSES, 404: {"model": models.ErrorOut, "description": "unknown account"}},
             summary="Devices, sessions, persons and drift events of a household")
    async def get_household(account_id: str = Path(..., min_length=1, max_length=128,
                                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"),
                            who: Principal = Depends(access("GET /v1/household/{account_id}"))):
        r = await clients.call("clustering", "GetHousehold",
                               cpb.GetHouseholdRequest(account_id=account_id), who)
        return _household_to_json(r)

    @app.get("/health", response_model=models.HealthOut, responses={503: {"model": models.HealthOut}})
    async def health():
        statuses = await clients.health()
        ok = all(s == "SERVING" for s in statuses.values())
        body = models.HealthOut(status="SERVING" if ok else "DEGRADED", services=statuses)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
