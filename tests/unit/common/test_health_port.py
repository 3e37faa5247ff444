"""HEARTH_HEALTH_PORT (server.serve_health_only): grpc.health alone, in plaintext, for the
kubelet's probes when the service port wants a client certificate — answered only once
one of the service's own workers is free, so a hung process still fails liveness."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.server import serve_health_only
from services.testing.ports import check_exit, free_port, start_on_free_ports


def _check(port: int, service: str = ""):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)


def test_the_health_port_answers_the_services_statuses_while_a_worker_is_free():
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    pool = futures.ThreadPoolExecutor(max_workers=1)

    def serve(_attempt: int):
        port = free_port()
        try:
            return serve_health_only(servicer, "127.0.0.1", port, pool, timeout_s=0.5), port
        except (RuntimeError, OSError) as exc:   # taken by another process since the draw: another port
            check_exit("the health port", str(exc), [port])
            raise

    stop, port = start_on_free_ports(serve, "the health port")
    release = threading.Event()
    try:
        assert _check(port).status == health_pb2.HealthCheckResponse.SERVING
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)   # the drain, a failing database
        assert _check(port).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _check(port, "liveness").status == health_pb2.HealthCheckResponse.SERVING
        pool.submit(release.wait)                                     # every worker stuck
        with pytest.raises(grpc.RpcError) as info:
            _check(port, "liveness")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert _check(port, "liveness").status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        stop()
        pool.shutdown()
