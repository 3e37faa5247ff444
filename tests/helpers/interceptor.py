"""A server built by ``build_server`` (the services' one bootstrap, so the real
interceptor) serving given clustering methods, with a shared-secret token signer and an
audit sink that keeps its records in memory: the interceptor's unit tests call it through
a real channel."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from services.common import audit, identity
from services.common.audit import AuditSink, MemoryAuditTransport
from services.common.identity import ServiceTokenSigner
from services.common.server import build_server


@dataclass
class Served:
    channel: grpc.Channel
    address: str
    transport: MemoryAuditTransport
    sink: AuditSink


@contextlib.contextmanager
def serving_clustering_methods(service: str, handlers: dict[str, grpc.RpcMethodHandler],
                               token_key: bytes) -> Iterator[Served]:
    previous_signer = identity._signer
    identity.configure_service_tokens(ServiceTokenSigner(token_key))
    transport = MemoryAuditTransport()
    sink = AuditSink(transport, component=service, max_delay_s=0)
    previous_sink = audit.install(sink)

    def register(server):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "hearth.clustering.v1.ClusteringService", handlers),))
        return []

    running = build_server(service, register, port=0)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.insecure_channel(address)
    try:
        yield Served(channel, address, transport, sink)
    finally:
        channel.close()
        running.server.stop(0)
        audit.install(previous_sink)
        sink.close()
        identity.configure_service_tokens(previous_signer)
