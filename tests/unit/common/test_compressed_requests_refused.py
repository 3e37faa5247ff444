"""A service's gRPC ports refuse compressed request messages before inflating them
(attack30). gRPC's core inflates a gzip message whole, before any interceptor and before
it compares the size with ``grpc.max_receive_message_length``: a 400 KB gzip of zeros sent
to ``Health/Check`` without any credential took a running clustering from 102 to 487 MB
resident (it answered RESOURCE_EXHAUSTED only after). No Hearth client compresses, so
only the identity encoding is accepted; the refusal names the encoding. A server built by
``build_server`` and the probes' health-only server, through real channels."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.server import build_server, serve_health_only

# Inflates to 32 MiB, past the 16 MiB request bound (and the health-only server's 4 MiB):
# without the refusal the server inflates it and answers RESOURCE_EXHAUSTED.
BOMB = health_pb2.HealthCheckRequest(service="0" * (32 << 20))


def _check(port: int, request, compression=None):
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=30, compression=compression)


def _refused_compressed(port: int) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _check(port, BOMB, grpc.Compression.Gzip)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, (refused.value.code(), refused.value.details())
    assert "gzip" in refused.value.details()
    with pytest.raises(grpc.RpcError) as small:   # any compressed message, not only a large one
        _check(port, health_pb2.HealthCheckRequest(), grpc.Compression.Deflate)
    assert small.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # An uncompressed request is answered as before.
    assert _check(port, health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_the_service_port_refuses_a_compressed_message_before_inflating_it():
    running = build_server("compression-refused", lambda server: [], port=0)
    try:
        _refused_compressed(running.port)
    finally:
        running.stop(0)


def test_the_health_only_port_refuses_a_compressed_message_before_inflating_it():
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = serve_health_only(servicer, "127.0.0.1", port)
    try:
        _refused_compressed(port)
    finally:
        stop()
