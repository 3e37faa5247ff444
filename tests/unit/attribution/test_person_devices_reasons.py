"""GetPersonDevices refused or failed: the reason an operator acts on (session 34). An older
clustering (without the RPC) is expected during a rolling upgrade; a refusal by one that serves
it, or of attribution's token, is a misconfiguration (HearthPersonDevicesRefused) and, like
an outage, fails the erasure's step for the job to retry (only the older release falls back). Until session 34 UNAUTHENTICATED / UNAVAILABLE were neither counted nor logged
by reason, and the docs read PERMISSION_DENIED as the older release.

Over a real gRPC server whose GetPersonDevices answers the status under test; the release
before 33 itself (UNIMPLEMENTED) is tests/e2e/test_deletion_e2e.py's, with that release's
clustering process."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest
from prometheus_client import REGISTRY

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.attribution.resolver import ClusteringResolver
from services.common.errors import Unavailable, status_for


class Refusing(cpb_grpc.ClusteringServiceServicer):
    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK

    def GetPersonDevices(self, request, context):
        if self.code != grpc.StatusCode.OK:
            context.abort(self.code, "refused")
        return cpb.GetPersonDevicesResponse(own_device_ids=["tab-1"], shared_device_ids=["tv-1"])


@pytest.fixture
def served():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = Refusing()
    cpb_grpc.add_ClusteringServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    resolver = ClusteringResolver(f"127.0.0.1:{port}", timeout_s=5)
    try:
        yield resolver, servicer
    finally:
        resolver.close()
        server.stop(0)


def _counts() -> dict[str, float]:
    return {reason: REGISTRY.get_sample_value("hearth_person_devices_fallbacks_total", {"reason": reason})
            for reason in ("unimplemented", "permission_denied", "unauthenticated", "unavailable")}


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {reason: value - before[reason] for reason, value in _counts().items() if value != before[reason]}


@pytest.mark.parametrize("code, reason, falls_back", [
    (grpc.StatusCode.UNIMPLEMENTED, "unimplemented", True),
    (grpc.StatusCode.PERMISSION_DENIED, "permission_denied", False),
    (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", False),
    (grpc.StatusCode.UNAVAILABLE, "unavailable", False),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "unavailable", False),
])
def test_each_refusal_is_counted_and_logged_by_its_reason(served, caplog, code, reason, falls_back):
    resolver, servicer = served
    assert resolver.person_devices("acct-1", "p-1") == (["tab-1"], ["tv-1"])
    servicer.code = code
    before = _counts()
    caplog.set_level(logging.WARNING, logger="hearth.attribution.resolver")
    if falls_back:
        assert resolver.person_devices("acct-1", "p-1") == ([], [])
    else:
        with pytest.raises((grpc.RpcError, Unavailable)) as raised:   # the erasure step fails; the job retries it
            resolver.person_devices("acct-1", "p-1")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            # A misconfiguration, not the upgrade: never a narrowed erasure (review34, the
            # lead's decision). Until then it fell back like UNIMPLEMENTED: the erasure
            # completed without the person's own devices, unrepairably. UNAVAILABLE to
            # privacy (retried), not the server's INTERNAL for an unexpected RpcError.
            assert isinstance(raised.value, Unavailable) and status_for(raised.value) == grpc.StatusCode.UNAVAILABLE
        else:
            assert raised.value.code() == code
    assert _delta(before) == {reason: 1.0}
    (line,) = [r for r in caplog.records if r.name == "hearth.attribution.resolver"]
    assert f"(reason {reason}:" in line.getMessage() and line.fields == {"reason": reason, "code": code.name}


def test_other_errors_are_not_counted(served):
    resolver, servicer = served
    servicer.code = grpc.StatusCode.INVALID_ARGUMENT
    before = _counts()
    with pytest.raises(grpc.RpcError):
        resolver.person_devices("acct-1", "p-1")
    assert _delta(before) == {}
