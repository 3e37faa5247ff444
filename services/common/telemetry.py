"""Tracing (OpenTelemetry), Prometheus metrics and JSON logs with trace ids.

One ``setup_telemetry`` per process. Trace context crosses process boundaries as W3C
``traceparent`` in gRPC metadata (``inject_context`` / ``extract_context``), so one trace
follows a request from the gateway through every service it touches.

Export (``HEARTH_TRACE_EXPORT``): ``otlp`` sends spans to a collector through a
``BatchSpanProcessor`` (a background thread: the request path only enqueues), over gRPC
or HTTP/protobuf as the standard ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` says; the
exporters read the other standard variables themselves (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``_HEADERS``, ``_CERTIFICATE``, ``_TIMEOUT``, ``_COMPRESSION``), the batch processor
``OTEL_BSP_*``, and the SDK the sampler (``OTEL_TRACES_SAMPLER`` / ``_ARG``).
``console`` prints batches to stderr; ``jsonl:<path>`` writes each span synchronously
(for tests and a laptop without a collector, never for production traffic).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family

# RED metrics per RPC; the same names on every service so one dashboard serves all.
RPC_REQUESTS = Counter(
    "hearth_rpc_requests_total", "RPCs handled", ["service", "method", "code"]
)
RPC_ERRORS = Counter(
    "hearth_rpc_errors_total", "RPCs that ended with a non-OK status", ["service", "method", "code"]
)
RPC_DURATION = Histogram(
    "hearth_rpc_duration_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.09, 0.1, 0.11, 0.15, 0.25, 0.5,
             1, 2.5, 5, 10),
)
# Calls being served (set from the server's Drain): after SIGTERM it falls to 0 as the
# calls under way finish, which is when the gRPC server is stopped.
RPC_IN_FLIGHT = Gauge("hearth_rpc_in_flight", "RPCs being served now", ["service"])
# Bucket edges at the alert thresholds (90 ms p95, 110 ms p99, 150 ms rollback) so the
# quantiles the alerts compare are not interpolated across a 100-250 ms bucket.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.09, 0.1, 0.11, 0.15, 0.25, 0.5,
                   1, 2.5, 5, 10)

_CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max",                     # cgroup v2
                         "/sys/fs/cgroup/memory/memory.limit_in_bytes")   # cgroup v1


def memory_limit_bytes() -> float:
    """The container's memory limit (cgroup), NaN when there is none: the memory alert
    divides process_resident_memory_bytes by it, and NaN never compares true."""
    for path in _CGROUP_MEMORY_LIMITS:
        try:
            with open(path, encoding="ascii") as fh:
                raw = fh.read().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:   # v1 "unlimited" is ~2^63
            return float("nan")
        return float(raw)
    return float("nan")


MEMORY_LIMIT = Gauge("hearth_memory_limit_bytes", "Memory limit of this process's container (cgroup)")
MEMORY_LIMIT.set_function(memory_limit_bytes)


# The data directory (HEARTH_DATA_DIR: SQLite files and their WALs, the audit outbox and
# reserve files): how full it and its volume are, read at each scrape. A full volume
# refuses writes (HearthDatabaseWritesRefused fires once it has happened); these let the
# alerts fire before it does, and before the kubelet evicts a pod whose emptyDir passed its
# sizeLimit (an evicted pod's emptyDir, its undelivered audit outbox with it, is gone).
DATA_DIR_USED = Gauge("hearth_data_dir_used_bytes",
                      "Bytes the files under the data directory occupy on disk (NaN: no data directory)")
DATA_DIR_LIMIT = Gauge("hearth_data_dir_limit_bytes",
                       "The data directory's size limit (HEARTH_DATA_DIR_SIZE_LIMIT; NaN: none known)")
DATA_VOLUME_FREE = Gauge("hearth_data_volume_free_bytes",
                         "Bytes this process may still write on the data directory's filesystem (NaN: unknown)")
DATA_VOLUME_SIZE = Gauge("hearth_data_volume_size_bytes",
                         "Size of the data directory's filesystem (NaN: unknown)")
for _gauge in (DATA_DIR_USED, DATA_DIR_LIMIT, DATA_VOLUME_FREE, DATA_VOLUME_SIZE):
    _gauge.set(float("nan"))


def directory_bytes(path: str | os.PathLike) -> float:
    """Bytes the files under ``path`` occupy on disk (allocated blocks, so a preallocated
    audit reserve file counts and a sparse one does not); NaN when ``path`` cannot be
    read. A data directory holds a handful of files, so walking it at each scrape is cheap."""
    total = 0
    try:
        for root, _dirs, files in os.walk(path, onerror=_raise):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:   # removed while walking (a WAL checkpointed away)
                    continue
    except OSError:
        return float("nan")
    return float(total)


def _raise(error: OSError) -> None:
    raise error


def volume_bytes(path: str | os.PathLike) -> tuple[float, float]:
    """(free, size) of the filesystem holding ``path``: free is what an unprivileged
    writer may still use (``f_bavail``: pods run as a non-root user); NaNs when unknown."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return float("nan"), float("nan")
    return float(stat.f_bavail * stat.f_frsize), float(stat.f_blocks * stat.f_frsize)


def watch_data_dir(path: str | os.PathLike, limit_bytes: int = 0) -> None:
    """Report the data directory ``path`` (and its volume) at every scrape from now on."""
    DATA_DIR_USED.set_function(lambda: directory_bytes(path))
    DATA_DIR_LIMIT.set(float(limit_bytes) if limit_bytes > 0 else float("nan"))
    DATA_VOLUME_FREE.set_function(lambda: volume_bytes(path)[0])
    DATA_VOLUME_SIZE.set_function(lambda: volume_bytes(path)[1])


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line to a file (a collector the tests
    and a developer without a tracing backend can read)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(json.dumps({
                "name": span.name,
                "service": span.resource.attributes.get("service.name"),
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_span_id": format(parent.span_id, "016x") if parent else None,
                "kind": span.kind.name,
                "status": span.status.status_code.name,
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "attributes": {k: str(v) for k, v in (span.attributes or {}).items()},
                "links": [{"trace_id": format(link.context.trace_id, "032x"),
                           "span_id": format(link.context.span_id, "016x")} for link in span.links or ()],
            }))
        with self._lock, open(self._path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        span_ctx = trace.get_current_span().get_span_context()
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if span_ctx.is_valid:
            payload["trace_id"] = format(span_ctx.trace_id, "032x")
            payload["span_id"] = format(span_ctx.span_id, "016x")
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        for key, value in getattr(record, "fields", {}).items():
            payload[key] = value
        return json.dumps(payload, default=str)


_setup_done = False

OTLP_PROTOCOLS = ("grpc", "http/protobuf")


def check_trace_export(value: str) -> str:
    """Validator of HEARTH_TRACE_EXPORT, shared by the services' and the gateway's settings."""
    if value in ("none", "otlp", "console") or (value.startswith("jsonl:") and len(value) > 6):
        return value
    raise ValueError("must be 'none', 'otlp', 'console' or 'jsonl:<path>'")


def otlp_protocol(environ: Mapping[str, str] = os.environ) -> str:
    """The OTLP transport the standard variables ask for (the spec's default is
    http/protobuf); anything else stops the process with the variable's name."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip()
        if value:
            if value not in OTLP_PROTOCOLS:
                raise SystemExit(f"invalid configuration:\n  {name}: must be one of {OTLP_PROTOCOLS}, "
                                 f"not {value!r}")
            return value
    return "http/protobuf"


def otlp_exporter(environ: Mapping[str, str] = os.environ) -> SpanExporter:
    """An OTLP span exporter configured from the standard OTEL_EXPORTER_OTLP_* variables."""
    if otlp_protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        from services.common.tls import IDENTITY_ENCODING_ONLY

        # Its own channel, not tls.channel_options(): without this a collector (or whatever
        # answers at its address) answering an export with a gzip of zeros was inflated
        # whole in every process, every few seconds (attack31). With it the channel sends
        # uncompressed too: OTEL_EXPORTER_OTLP_COMPRESSION=gzip is not applied over gRPC
        # (gRPC logs "default compression algorithm gzip not enabled"; docs/operations.md).
        return GrpcExporter(channel_options=(IDENTITY_ENCODING_ONLY,))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # A session of OpenTelemetry's own credential provider, when one is configured, as is.
    provided = any(name.startswith("OTEL_PYTHON_EXPORTER_OTLP_HTTP_") and name.endswith("CREDENTIAL_PROVIDER")
                   for name in environ)
    return OTLPSpanExporter() if provided else OTLPSpanExporter(session=_bounded_answers_session())


# The most of a collector's answer read (decompressed): an OTLP export's answer is a few
# bytes (a partial success with a message at most). requests reads an answer whole and
# inflates a gzip body: 64 MiB from 64 KB, in every process at every export (attack31).
OTLP_MAX_ANSWER_BYTES = 1 << 20


def _bounded_answers_session():
    import requests

    class BoundedAnswers(requests.Session):
        """A session that reads at most OTLP_MAX_ANSWER_BYTES of an answer, decompressed a
        piece at a time (urllib3 inflates a streamed body in bounded pieces); the rest is
        not read and the connection closed."""

        def request(self, method, url, **kwargs):
            kwargs["stream"] = True
            response = super().request(method, url, **kwargs)
            body = bytearray()
            try:
                for chunk in response.iter_content(64 * 1024):
                    body += chunk
                    if len(body) >= OTLP_MAX_ANSWER_BYTES:
                        del body[OTLP_MAX_ANSWER_BYTES:]
                        break
            finally:
                response.close()
            response._content = bytes(body)   # what requests reads into when not streaming
            return response

    return BoundedAnswers()


def service_resource(service: str) -> Resource:
    """service.name / service.version / service.namespace; OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES override them (standard precedence: the operator wins)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        service_version = version("hearth")
    except PackageNotFoundError:
        service_version = "unknown"
    ours = Resource.create({"service.name": service, "service.version": service_version,
                            "service.namespace": "hearth"})
    return ours.merge(OTELResourceDetector().detect())


def span_processor(trace_export: str):
    """The span processor for a HEARTH_TRACE_EXPORT value, or None for "none"."""
    if trace_export == "otlp":
        return BatchSpanProcessor(otlp_exporter())
    if trace_export == "console":
        return BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    if trace_export.startswith("jsonl:"):
        # Synchronous on purpose: a span is on disk when its RPC returns, so a test
        # never waits for a flush. Never for production traffic (use otlp).
        return SimpleSpanProcessor(JsonLinesSpanExporter(trace_export[6:]))
    return None


def setup_telemetry(service: str, trace_export: str = "none", log_level: str = "INFO",
                    metrics_port: int | None = None, host: str = "127.0.0.1") -> None:
    """Configure tracing, logging and (when a port is given) the /metrics HTTP server.

    Idempotent per process; the first call wins (tests start several in-process
    servers)."""
    global _setup_done
    if _setup_done:
        return
    _setup_done = True
    # The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default
    # parentbased_always_on), so a sampled-out request is sampled out in every service.
    # The provider flushes its batch processor at interpreter exit (after SIGTERM; the
    # gateway, which dies by the signal uvicorn raises again, calls flush_traces itself).
    provider = TracerProvider(resource=service_resource(service))
    processor = span_processor(trace_export)
    if processor is not None:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    if metrics_port:
        serve_metrics(metrics_port, host)


# A metrics connection that sends nothing for this long is closed. The ports admit every
# source (Prometheus scrapes them, no credentials) and prometheus_client serves each
# connection on a thread of its own with no timeout: until session 26 (attack26) a client
# sending half a request and waiting held a thread per connection for as long as it liked
# (390 connections: 390 threads, +38 MB in feedback). A scrape sends its request at once.
METRICS_CONNECTION_TIMEOUT_S = 10.0


class ConnectionDeadline:
    """For a ``socketserver.StreamRequestHandler`` serving one request a connection (the
    first base of the handler class): ``timeout`` bounds each read, and the whole
    connection (the request and its answer) gets ``connection_deadline_s``, then its socket
    is shut — a client sending a byte of its request every few seconds otherwise kept its
    thread for as long as it liked (review26). The metrics ports' and the rollback
    webhook's."""

    connection_deadline_s = METRICS_CONNECTION_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(self.connection_deadline_s, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:   # closed meanwhile
            pass

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()


class _MetricsRequestHandler(ConnectionDeadline, WSGIRequestHandler):
    timeout = METRICS_CONNECTION_TIMEOUT_S   # StreamRequestHandler: the connection's socket timeout

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        """Log nothing (prometheus_client's handler does the same)."""


def serve_metrics(port: int, host: str = "0.0.0.0") -> WSGIServer:
    """prometheus_client's ``start_http_server`` for the default registry, but with a
    timeout on each connection (``METRICS_CONNECTION_TIMEOUT_S``)."""
    class Server(ThreadingWSGIServer):   # the address family of ``host`` (an IPv6 one too)
        def handle_error(self, request, client_address) -> None:
            # A connection cut by its timeout or its client: socketserver's default prints a
            # traceback on stderr, one per such connection (not a JSON log line).
            log = logging.getLogger("hearth.metrics")
            log.debug("metrics connection ended early", exc_info=True)

    Server.address_family, host = _get_best_family(host, port)
    try:
        httpd = make_server(host, port, make_wsgi_app(), Server, handler_class=_MetricsRequestHandler)
    except OSError as exc:   # say which port ("[Errno 98] Address already in use" named none)
        raise OSError(exc.errno, f"{exc.strerror}: the metrics port {host}:{port}") from exc
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd


def flush_traces(timeout_s: float = 5.0) -> None:
    """Export every finished span still queued in the batch processor, now.

    The services' batch is flushed by the provider's interpreter-exit hook after
    ``serve()`` returns. The gateway never gets there: uvicorn, after its graceful
    shutdown, raises the SIGTERM it caught again with the default handler, so the
    process dies by the signal and no exit hook runs — the last batch of the gateway's
    spans, the root of every trace, was lost at every stop (session 20,
    tests/e2e/test_otlp_tracing.py). The gateway calls this at the end of its lifespan.
    Not a shutdown: the provider keeps working (in-process tests run many apps)."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush(int(timeout_s * 1000))


def tracer(name: str = "hearth") -> trace.Tracer:
    return trace.get_tracer(name)


@contextlib.contextmanager
def safe_span(tracer: trace.Tracer, name: str, **kwargs):
    """``tracer.start_as_current_span`` that never copies an exception's text into the
    span. OpenTelemetry's default records an ``exception`` event (message and stack
    trace) and a status description ``"<type>: <message>"``; a gRPC error's message names
    the field and often the value (``account_id: unknown account 'acc-1'``), which would
    put household ids in clear into the trace backend (docs/privacy.md, §11). The status
    says only the gRPC code or the exception's type."""
    with tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False,
                                      **kwargs) as span:
        try:
            yield span
        except BaseException as exc:
            code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
            if isinstance(code, grpc.StatusCode):
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            else:
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise


def inject_context(metadata: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Current trace context as gRPC metadata pairs (W3C traceparent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    out = list(metadata or [])
    out.extend(carrier.items())
    return out


def context_carrier() -> dict[str, str]:
    """The current trace context as a W3C carrier (``{"traceparent": ...}``), for work
    that outlives the request (a deletion job stores it and resumes the trace later)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(metadata: Sequence[tuple[str, str | bytes]] | Mapping[str, str] | None) -> otel_context.Context:
    if metadata is None:
        return propagate.extract({})
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    carrier = {k: v for k, v in items if isinstance(v, str)}
    return propagate.extract(carrier)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


_PSEUDONYM_KEY: bytes | None = None


def configure_pseudonym_key(configured: str) -> None:
    """The key of ``pseudonym``: derived from ``configured`` (the bootstrap passes
    HEARTH_LOG_PSEUDONYM_KEY, else the mesh secret), a random per-process key when empty."""
    import hashlib
    import hmac
    import secrets

    global _PSEUDONYM_KEY
    _PSEUDONYM_KEY = (hmac.new(configured.encode(), b"hearth-log-pseudonym-v1", hashlib.sha256).digest()
                      if configured else secrets.token_bytes(32))
    _PSEUDONYMS.clear()


# principal id -> pseudonym under the current key (``pseudonym(..., cache=True)``): every
# RPC's span names its principal, and the principals of a mesh are few (services, API
# keys), so the HMAC is computed once per principal. Household ids are never cached (an
# erased household leaves nothing in memory).
_PSEUDONYMS: dict[str, str] = {}


def pseudonym(value: str, *, cache: bool = False) -> str:
    """The id as it may appear in logs and traces: ``ps_`` + 16 hex of a keyed HMAC.

    Logs and trace files are not rewritten when a household is erased, so they never
    hold its ids in clear (docs/privacy.md, "What erased means"): the same id gives the
    same pseudonym in every process of the mesh (to follow one household through the
    logs, an operator computes its pseudonym with the key), and without the key it
    cannot be turned back into the id. Key: ``HEARTH_LOG_PSEUDONYM_KEY``, else derived
    from the transitional mesh secret ``HEARTH_SERVICE_TOKEN_KEY``, else a random key per
    process (pseudonyms then differ between processes: the chart and ``Mesh`` set one)."""
    known = _PSEUDONYMS.get(value) if cache else None
    if known is not None:
        return known
    import hashlib
    import hmac

    if _PSEUDONYM_KEY is None:
        from services.common.config import mesh_settings

        settings = mesh_settings()
        configure_pseudonym_key(settings.log_pseudonym_key.get_secret_value()
                                or settings.service_token_key.get_secret_value())
    key = _PSEUDONYM_KEY
    out = "ps_" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]
    if cache and key is _PSEUDONYM_KEY:   # not if the key changed meanwhile
        if len(_PSEUDONYMS) > 4096:        # bounded: principals are many only under attack
            _PSEUDONYMS.clear()
        _PSEUDONYMS[value] = out
    return out
