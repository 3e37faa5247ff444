"""A real OTLP trace receiver for tests: the collector's TraceService over gRPC and the
OTLP/HTTP ``POST /v1/traces`` endpoint (protobuf), both decoding with opentelemetry-proto,
storing every span with its resource so a test can rebuild trace trees."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.helpers.http_peer import QuietHandler, answer


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str       # "" for a root span
    name: str
    kind: int
    service: str              # resource service.name
    resource: dict
    attributes: dict
    transport: str            # "grpc" or "http": how the span reached the receiver


def _any_value(value) -> object:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                receiver.add(request, "grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")

        class Handler(QuietHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
                answer(self, trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                       "application/x-protobuf")

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def start(self) -> "OtlpReceiver":
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest, transport: str) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _any_value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(ReceivedSpan(
                        s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                        str(resource.get("service.name", "")), resource,
                        {a.key: _any_value(a.value) for a in s.attributes}, transport))
        with self._lock:
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate, timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """Poll until ``predicate(all spans so far)`` is true; return the spans."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


def tree_roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """Spans whose parent is not among ``spans``: exactly one for a connected trace tree."""
    ids = {s.span_id for s in spans}
    return [s for s in spans if s.parent_span_id not in ids]
