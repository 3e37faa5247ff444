"""The mesh's clients refuse compressed response messages instead of inflating them
(attack31; the requests' side is attack30's, test_compressed_requests_refused.py). gRPC's
core inflates a ``grpc-encoding: gzip`` response whole before it compares its size with
``grpc.max_receive_message_length``: a peer answering 400 MiB of zeros as ~400 KB of gzip
took a client from 28 to 457 MB resident before the call failed RESOURCE_EXHAUSTED. A
compromised or confused peer (a service replica, or whatever answers at a peer's address)
could do that to every caller of it. No Hearth server compresses, so the clients' channels
(``tls.channel_options()``: services' peers, health probes of peers, the gateway) enable
the identity encoding only: the core never inflates such a message — the call fails, or
(when the whole answer arrived at once) the raw compressed bytes reach the stub, which
cannot parse gzip as a message. Real servers and channels on loopback."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

from services.common import tls

# Inflates to 24 MiB, under the clients' 64 MiB response bound: before the refusal the
# client inflated it and handed it over whole.
PAYLOAD = b"\0" * (24 << 20)


def _raw(request, context):
    context.set_compression(grpc.Compression.Gzip)
    return PAYLOAD


@pytest.fixture(scope="module")
def compressing_server():
    """A server whose ``/t.Bomb/Get`` answers PAYLOAD gzip-compressed (~24 KB on the wire)
    even to a client that accepts the identity encoding only, as a hostile peer would."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Bomb", {"Get": grpc.unary_unary_rpc_method_handler(_raw)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_control_client_without_the_options_takes_the_compressed_answer(compressing_server):
    # The server really compresses, and a plain client inflates it: what the mesh's
    # clients must not do.
    with grpc.insecure_channel(compressing_server, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        assert ch.unary_unary("/t.Bomb/Get")(b"", timeout=30) == PAYLOAD


def test_the_mesh_channel_does_not_inflate_a_compressed_answer(compressing_server):
    with tls.channel(compressing_server, options=tls.channel_options()) as ch:
        try:
            answer = ch.unary_unary("/t.Bomb/Get")(b"", timeout=30)
        except grpc.RpcError as refused:
            assert refused.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL), refused
        else:
            assert len(answer) < len(PAYLOAD) // 100, len(answer)   # the raw gzip, never inflated


def test_the_gateway_channel_does_not_inflate_a_compressed_answer(compressing_server):
    async def main():
        async with tls.aio_channel(compressing_server, options=tls.channel_options()) as ch:
            try:
                answer = await ch.unary_unary("/t.Bomb/Get")(b"", timeout=30)
            except grpc.RpcError as refused:
                assert refused.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL), refused
            else:
                assert len(answer) < len(PAYLOAD) // 100, len(answer)

    asyncio.run(main())


def test_the_otlp_grpc_exporter_does_not_inflate_a_compressed_answer(compressing_server, monkeypatch):
    """The trace exporter's own channel (OTLP over gRPC) is built by the OpenTelemetry
    exporter, not by tls.channel_options(): a collector — or whatever answers at its
    address — answering each export (every few seconds, in every process) with a gzip of
    zeros was inflated whole before anything looked at it."""
    from services.common import telemetry

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://{compressing_server}")
    exporter = telemetry.otlp_exporter()
    try:
        try:
            answer = exporter._channel.unary_unary("/t.Bomb/Get")(b"", timeout=30)
        except grpc.RpcError as refused:
            assert refused.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED), refused
            assert "larger than max" not in (refused.details() or ""), refused.details()   # inflated, then refused
        else:
            assert len(answer) < len(PAYLOAD) // 100, len(answer)
    finally:
        exporter.shutdown()


def test_the_otlp_http_exporter_does_not_inflate_a_compressed_answer(monkeypatch):
    """The same over OTLP/HTTP (the default protocol): `requests` read the collector's
    answer whole and inflated a `Content-Encoding: gzip` body, 64 MiB from 64 KB, at every
    export. At most telemetry.OTLP_MAX_ANSWER_BYTES of it is read now. A real HTTP server."""
    import gzip

    from services.common import telemetry
    from tests.helpers.http_peer import QuietHandler, answer, serving

    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)

    class Collector(QuietHandler):
        def do_POST(self):   # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer(self, bomb, "application/x-protobuf", content_encoding="gzip")

    with serving(Collector) as url:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{url}/v1/traces")
        exporter = telemetry.otlp_exporter()
        try:
            session = exporter._client._transport._session   # the session its exports go through
            reply = session.request("POST", f"{url}/v1/traces", data=b"x", timeout=30)
            assert reply.status_code == 200
            assert len(reply.content) <= 1 << 20, len(reply.content)
        finally:
            exporter.shutdown()
