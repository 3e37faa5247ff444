"""A stopping gateway's requests waiting on a service that does not answer
(ServiceClients.abandon_hung, called by gateway.__main__.GatewayServer during uvicorn's
graceful stop): their calls are cancelled and end UNAVAILABLE (503 with Retry-After),
later calls to that service fail at once; a service that answers its health check keeps
its calls. Real gRPC servers in this process; a health check that never answers stands
for a SIGSTOPped one (tests/e2e/test_stop_hung_peer_e2e.py freezes a real process)."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.clients import SERVICES, ServiceClients
from gateway.errors import from_rpc_error


class _Health(health_pb2_grpc.HealthServicer):
    def __init__(self, answers: bool, release: threading.Event) -> None:
        self._answers, self._release = answers, release

    def Check(self, request, context):
        if not self._answers:
            self._release.wait(30)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _server(answers: bool, release: threading.Event) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(8))
    health_pb2_grpc.add_HealthServicer_to_server(_Health(answers, release), server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Slow", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda request, context: release.wait(30) and b"done")}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def two_services():
    release = threading.Event()
    hung, hung_address = _server(False, release)
    alive, alive_address = _server(True, release)
    addresses = {name: alive_address for name in SERVICES} | {"privacy": hung_address}
    try:
        yield addresses, release
    finally:
        release.set()
        hung.stop(0)
        alive.stop(0)


def test_calls_to_a_service_that_does_not_answer_end_unavailable_the_others_continue(two_services):
    addresses, release = two_services

    async def scenario():
        clients = ServiceClients(addresses, timeout_s=30, health_timeout_s=1)
        await clients.start()
        try:
            def slow(service: str):
                channel = clients._channels[service]
                return asyncio.ensure_future(clients._tracked(service, channel.unary_unary("/t.Slow/Call")(
                    b"x", timeout=30)))

            to_privacy = [slow("privacy") for _ in range(2)]
            to_feedback = slow("feedback")
            await asyncio.sleep(0.3)   # the calls are under way
            assert await clients.abandon_hung(0.3) == ["privacy"]
            outcomes = await asyncio.gather(*to_privacy, return_exceptions=True)
            assert not to_feedback.done()   # feedback answered its health check: its call goes on
            later = slow("privacy")
            with pytest.raises(grpc.aio.AioRpcError) as at_once:
                await asyncio.wait_for(later, 1)
            release.set()
            assert await to_feedback == b"done"
            return outcomes, at_once.value
        finally:
            await clients.close()

    outcomes, later = asyncio.run(scenario())
    assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.UNAVAILABLE for o in outcomes)
    response = from_rpc_error(outcomes[0])
    assert response.status_code == 503 and response.headers["retry-after"].isdigit()
    assert later.code() == grpc.StatusCode.UNAVAILABLE
