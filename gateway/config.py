"""Gateway settings (HEARTH_* environment variables, validated at start)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictInt, field_validator, model_validator

from services.common.config import MeshSettings, Port, Positive, bounded
from services.common.permissions import route_permission
from gateway.clients import SERVICES as UPSTREAMS   # each has its own admission limit
from services.common.telemetry import check_trace_export


class RateLimitSpec(BaseModel):
    """A token bucket: ``burst`` requests at once, refilled at ``per_s`` per second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_s: float = Field(gt=0, le=1_000_000)
    burst: int = Field(ge=1, le=1_000_000)


class AdmissionSpec(BaseModel):
    """Admission limit of one upstream service (gateway/admission.py): requests handled at
    once, requests waiting for a slot, and how long one may wait before a 503."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_in_flight: int = Field(ge=1, le=100_000)
    max_queue: int = Field(ge=0, le=1_000_000)
    queue_timeout_s: float = Field(ge=0, le=60)


class GatewaySettings(MeshSettings):

    host: str = "127.0.0.1"
    gateway_port: Port = 8080
    # Prometheus /metrics on a port of its own, not reachable through the public Service
    # or Ingress (the chart sets 9100, `make run` a free port); 0 (the default, for a
    # gateway started by hand) serves /metrics on the gateway port instead.
    metrics_port: Port = 0
    # One JSON line per request (logger hearth.access): method, route template (never the
    # raw path: it holds account ids), status, duration, trace id.
    access_log: bool = True
    # Serve /v1/edge/authorize/... for the Envoy edge's ext_authz (gateway/routes/edge.py)
    # on this port, and only there (0: off). It hands out the caller's signed mesh
    # metadata, so it is off unless Envoy runs, and never on HEARTH_GATEWAY_PORT: until
    # session 19 it was served there, and any authenticated client could fetch a mesh
    # token and call a service port directly, past the gateway's rate limits. The chart
    # lets only the Envoy pods reach this port (NetworkPolicy).
    edge_authorizer_port: Port = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    trace_export: str = "none"
    # Where the audit outbox lives (audit records wait there while privacy is unreachable).
    data_dir: Path = Path("var")

    clustering_addr: str = "127.0.0.1:50051"
    attribution_addr: str = "127.0.0.1:50052"
    privacy_addr: str = "127.0.0.1:50053"
    feedback_addr: str = "127.0.0.1:50054"
    # Deadline of every gateway -> service call; health checks use their own, shorter one.
    rpc_timeout_s: Positive = 10.0
    health_timeout_s: Positive = 1.0
    # On SIGTERM, how long requests in flight may run before uvicorn cancels them (its
    # timeout_graceful_shutdown). The same variable as the services' drain, and the same
    # reasoning: at least rpc_timeout_s, so a request waiting on a service is not cut
    # while the service still finishes the call. The chart sets it from shutdown.graceSeconds.
    grace_seconds: Positive = 10.0
    # POST /v1/feedback on a prediction the feedback service does not know yet waits up to
    # this long for it: clustering logs every prediction durably before answering and
    # forwards it to feedback a moment later (every 0.2 s), so feedback sent at once after
    # /v1/assign would otherwise get a 404 for an id the mesh has just handed out.
    # 0 answers the 404 at once (a caller then retries it, as gRPC callers do).
    feedback_prediction_wait_s: float = Field(2.0, ge=0, le=30)

    # API keys: a JSON file, see gateway/auth.py for the format (ids, hashes, revocation).
    # Only SHA-256 hashes are ever stored; the file is re-read when it changes: its
    # mtime is checked at most every api_keys_reload_s (and at once for an unknown key,
    # so a new key works immediately), so a revocation holds within that interval.
    # make run writes var/gateway-keys.json.
    api_keys_file: Path | None = None
    api_keys_reload_s: float = Field(1.0, ge=0, le=60)
    max_body_bytes: Annotated[int, bounded(ge=1024, le=1024 * 1024 * 1024,
                                           message="must be between 1 KiB and 1 GiB")] = 8 * 1024 * 1024

    # JWT bearer tokens (Authorization: Bearer ...). Disabled unless an algorithm is set.
    # The algorithm is fixed here: a token whose header names another one is refused.
    # RS256/ES256 verify with a public key; HS256 needs an explicit shared secret.
    jwt_algorithm: Literal["RS256", "ES256", "HS256"] | None = None
    jwt_public_key_file: Path | None = None
    jwt_hs256_secret: SecretStr | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_role_claim: str = "hearth_role"
    jwt_leeway_s: Annotated[float, bounded(ge=0, le=300, message="must be between 0 and 300 seconds")] = 30.0

    # Rate limits per (principal, route): token buckets. Routes not listed in
    # rate_limits get the default. JSON, e.g.
    # HEARTH_RATE_LIMITS='{"POST /v1/events": {"per_s": 20, "burst": 40}}'.
    # With HEARTH_REDIS_URL the buckets live in Redis and every replica shares them.
    rate_limit_enabled: bool = True
    rate_limit_default: RateLimitSpec = RateLimitSpec(per_s=50, burst=100)
    rate_limits: dict[str, RateLimitSpec] = Field(default_factory=dict)
    redis_url: str = ""
    # Requests one principal may have in flight per costly route at this gateway replica
    # (gateway/ratelimit.py DEFAULT_IN_FLIGHT_LIMITS: attribution, the two exports 2 each,
    # key rotation 1); past it 429 too_many_in_flight. Overrides per route on top of that
    # table, 0 = no bound, e.g. HEARTH_IN_FLIGHT_LIMITS='{"POST /v1/attribution": 4}'.
    # Off with rate_limit_enabled=false.
    in_flight_limits: dict[str, StrictInt] = Field(default_factory=dict)

    # Admission control per upstream service (gateway/admission.py): past these bounds the
    # gateway answers 503 "overloaded" + Retry-After at once instead of queueing into
    # collapse. The default suits one gateway in front of one replica of each service on a
    # couple of cores (docs/benchmarks.md, "make verify"): enough in flight to keep the
    # service busy (it batches commits across concurrent calls), a queue that absorbs
    # bursts of half a second. Per service, e.g.
    # HEARTH_ADMISSION_LIMITS='{"attribution": {"max_in_flight": 4, "max_queue": 8, "queue_timeout_s": 2}}'.
    admission_enabled: bool = True
    admission_default: AdmissionSpec = AdmissionSpec(max_in_flight=32, max_queue=64, queue_timeout_s=0.5)
    admission_limits: dict[str, AdmissionSpec] = Field(default_factory=dict)
    # A request's body must arrive within this many seconds, else 408 and the connection
    # is closed (gateway/admission.py BodyDeadline; it is read before the request takes
    # an admission slot, so a slow sender holds no slot). 8 MiB in 30 s is ~280 KB/s.
    body_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # Bytes of a request's head (request line + headers) before the gateway answers 431
    # and closes the connection (gateway/transport.py; uvicorn and httptools set none).
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    # A request's head must be complete within this many seconds of the gateway starting to
    # wait for it (a new connection, or the end of the previous response), else 408 and the
    # connection closed (gateway/transport.py; uvicorn and httptools set no such deadline).
    head_timeout_s: float = Field(default=10.0, gt=0, le=600)

    # HTTPS for clients of the gateway (a public certificate, not the mesh CA's).
    https_cert: Path | None = None
    https_key: Path | None = None

    @field_validator("trace_export")
    @classmethod
    def _trace_export(cls, value: str) -> str:
        return check_trace_export(value)

    @field_validator("rate_limits", "in_flight_limits")
    @classmethod
    def _known_routes(cls, value: dict) -> dict:
        unknown = [route for route in value if route_permission(route) is None]
        if unknown:
            raise ValueError(f"unknown route(s) {unknown}: use 'METHOD /path' as in the permission matrix")
        return value

    @field_validator("in_flight_limits")
    @classmethod
    def _in_flight_bounds(cls, value: dict[str, int]) -> dict[str, int]:
        bad = [route for route, limit in value.items() if not 0 <= limit <= 100_000]
        if bad:
            raise ValueError(f"{bad}: a limit is 0 (none) .. 100000")
        return value

    @field_validator("admission_limits")
    @classmethod
    def _known_upstreams(cls, value: dict[str, AdmissionSpec]) -> dict[str, AdmissionSpec]:
        unknown = sorted(set(value) - set(UPSTREAMS))
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}: one of {list(UPSTREAMS)}")
        return value

    def admission_for(self, service: str) -> AdmissionSpec:
        return self.admission_limits.get(service, self.admission_default)

    @model_validator(mode="after")
    def _edge_authorizer_port(self) -> "GatewaySettings":
        if self.edge_authorizer_port and self.edge_authorizer_port in (self.gateway_port, self.metrics_port):
            raise ValueError("HEARTH_EDGE_AUTHORIZER_PORT must differ from HEARTH_GATEWAY_PORT and "
                             "HEARTH_METRICS_PORT (the authorizer is never served on a public port)")
        return self

    @model_validator(mode="after")
    def _body_fits_a_message(self) -> "GatewaySettings":
        # A body's protobuf is never larger than its JSON (keys dropped, timestamps and
        # enums shorter): a body within HEARTH_MAX_BODY_BYTES makes a message the services
        # read (docs/security.md, "Attacker's review (session 21)", mended item 7).
        if self.max_body_bytes > self.grpc_max_message_bytes:
            raise ValueError("HEARTH_MAX_BODY_BYTES must not exceed HEARTH_GRPC_MAX_MESSAGE_BYTES (a body "
                             "makes a gRPC message of up to its size, which the services must read)")
        return self

    @model_validator(mode="after")
    def _jwt(self) -> "GatewaySettings":
        if self.jwt_algorithm is None:
            return self
        if not self.jwt_issuer or not self.jwt_audience:
            raise ValueError("HEARTH_JWT_ISSUER and HEARTH_JWT_AUDIENCE are required with HEARTH_JWT_ALGORITHM")
        if self.jwt_algorithm == "HS256":
            if self.jwt_hs256_secret is None or len(self.jwt_hs256_secret.get_secret_value()) < 32:
                raise ValueError("HEARTH_JWT_HS256_SECRET (at least 32 characters) is required "
                                 "with HEARTH_JWT_ALGORITHM=HS256")
            if self.jwt_public_key_file is not None:
                raise ValueError("HEARTH_JWT_PUBLIC_KEY_FILE must not be set with HS256")
        else:
            if self.jwt_public_key_file is None:
                raise ValueError(f"HEARTH_JWT_PUBLIC_KEY_FILE is required with {self.jwt_algorithm}")
            if self.jwt_hs256_secret is not None:
                raise ValueError(f"HEARTH_JWT_HS256_SECRET must not be set with {self.jwt_algorithm}")
        return self

    @model_validator(mode="after")
    def _https(self) -> "GatewaySettings":
        if (self.https_cert is None) != (self.https_key is None):
            raise ValueError("HEARTH_HTTPS_CERT and HEARTH_HTTPS_KEY go together")
        return self
