"""What a degraded service's health says, and to whom: the full reasons (internal
addresses, driver text) over the service's gRPC health, which only the mesh can reach;
the failing checks' names only in the gateway's public /health (docs/operations.md,
"Health")."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.clients import SERVICES, ServiceClients
from services.common.health_report import FAILING_KEY, REASON_KEY, ReportingHealthServicer

REASONS = ["peer privacy: 10.0.3.7:50053 unreachable (UNAVAILABLE)",
           'database: OperationalError: connection to server at "hearth-postgres.prod.svc:5432" failed: '
           "Connection refused; is the server running on that host"]


@pytest.fixture
def degraded():
    servicer = ReportingHealthServicer()
    servicer.set_reasons(REASONS)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_the_services_grpc_health_carries_the_full_reasons_and_the_failing_names(degraded):
    address, _ = degraded
    with grpc.insecure_channel(address) as channel:
        _, call = health_pb2_grpc.HealthStub(channel).Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
    trailing = dict(call.trailing_metadata())
    assert trailing[REASON_KEY] == "; ".join(REASONS)
    assert trailing[FAILING_KEY] == "peer privacy; database"


def test_the_gateways_health_names_the_failing_checks_never_their_addresses(degraded, caplog):
    address, servicer = degraded

    async def ask():
        clients = ServiceClients({name: address for name in SERVICES}, 5.0, 5.0)
        await clients.start()
        try:
            return await clients.health()
        finally:
            await clients.close()

    with caplog.at_level("WARNING", logger="hearth.gateway.health"):
        statuses, reasons = asyncio.run(ask())
    assert set(statuses.values()) == {"SERVING"}
    assert reasons == {name: "peer privacy: failing; database: failing" for name in SERVICES}
    for text in ("10.0.3.7", "50053", "hearth-postgres", "5432", "Connection refused"):
        assert text not in str(reasons)
    assert "10.0.3.7:50053 unreachable" in caplog.text   # the operators' copy: the gateway's log
    servicer.set_reasons([])
    assert asyncio.run(ask())[1] == {}


def test_a_reason_with_a_newline_or_non_ascii_text_still_answers_the_health_check():
    """PostgreSQL's DiskFull message carries a second line ("HINT:  Check free disk
    space."): as the `database writes` reason it made the trailing metadata an illegal
    header value, so every Check failed (the gateway and the peers saw DEADLINE_EXCEEDED,
    a kubelet probe would fail) for the 30 s the check stays failing (session 25's full
    PostgreSQL volume drill). The reason travels on one line of printable ASCII."""
    servicer = ReportingHealthServicer()
    servicer.set_reasons(['database writes: writes refused: DiskFull: could not extend file "base/5/16653": '
                          "No space left on device\nHINT:  Check free disk space. (3 s ago)",
                          "peer feedback: r\u00e9seau coup\u00e9\u2026\t(UNAVAILABLE)"])
    trailing = _check_over_grpc(servicer)
    assert trailing[REASON_KEY] == ('database writes: writes refused: DiskFull: could not extend file '
                                    '"base/5/16653": No space left on device HINT: Check free disk space. (3 s ago); '
                                    "peer feedback: r?seau coup?? (UNAVAILABLE)")
    assert trailing[FAILING_KEY] == "database writes; peer feedback"


def test_a_very_long_reason_is_cut_and_the_health_check_still_answers():
    """gRPC refuses received metadata over 16 KiB (RESOURCE_EXHAUSTED): a 20,000-character
    driver message as a reason failed every Check; now each reason is cut at 1,000."""
    servicer = ReportingHealthServicer()
    servicer.set_reasons(["database: " + "x" * 20_000, "peer feedback: down"])
    trailing = _check_over_grpc(servicer)
    assert trailing[REASON_KEY] == "database: " + "x" * 987 + "...; peer feedback: down"
    assert trailing[FAILING_KEY] == "database; peer feedback"


def _check_over_grpc(servicer: ReportingHealthServicer) -> dict:
    """One Check of ``servicer`` served by a real gRPC server: asserts it answered SERVING
    and returns its trailing metadata (what a kubelet probe or a peer reads)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer, call = health_pb2_grpc.HealthStub(channel).Check.with_call(health_pb2.HealthCheckRequest(),
                                                                               timeout=5)
    finally:
        server.stop(0)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    return dict(call.trailing_metadata())
