"""A flood of refused requests through real processes writes one "security event" line per
kind of refusal, not one per request (services/common/identity.py, ``SecurityEventLog``;
session 34), while hearth_auth_failures_total counts every one: keyless requests at the
gateway and forged service tokens at a service's gRPC port. Until session 34 each was a
line of its own (~300 bytes)."""

from __future__ import annotations

import json
import re

import grpc
import httpx

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.common import identity
from services.testing.mesh import running_mesh

FLOOD = 150


def _security_lines(path) -> list[dict]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg", "").startswith("security event"):
            lines.append(record)
    return lines


def _auth_failures(port: int, component: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        rf'^hearth_auth_failures_total\{{component="{component}",reason="[^"]+"\}} (\S+)$', text, re.M))


def test_a_flood_of_refusals_is_one_log_line_per_kind_and_every_one_is_counted(tmp_path):
    with running_mesh(tmp_path) as mesh:
        gateway_before = _auth_failures(mesh.gateway_metrics_port, "gateway")
        clustering_before = _auth_failures(mesh.metrics_ports["clustering"], "clustering")
        with httpx.Client(base_url=mesh.url, timeout=30) as client:
            for _ in range(FLOOD):
                assert client.get("/v1/household/acc-1").status_code == 401
        forged = [(identity.PRINCIPAL_KEY, "svc:privacy"), (identity.ROLE_KEY, "service"),
                  (identity.TOKEN_KEY, "v2.clustering.4102444800.Zm9yZ2VkLXNpZ25hdHVyZQ")]
        with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['clustering']}") as channel:
            stub = cpb_grpc.ClusteringServiceStub(channel)
            for _ in range(FLOOD):
                try:
                    stub.GetHousehold(cpb.GetHouseholdRequest(account_id="acc-1"), metadata=forged, timeout=30)
                    raise AssertionError("a forged token was accepted")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
        assert _auth_failures(mesh.gateway_metrics_port, "gateway") - gateway_before == FLOOD
        assert _auth_failures(mesh.metrics_ports["clustering"], "clustering") - clustering_before == FLOOD
        gateway_lines = _security_lines(mesh.log_dir / "gateway.log")
        clustering_lines = _security_lines(mesh.log_dir / "clustering.log")
    # One kind each (the same reason, principal and route): its first line, whole, and at
    # most one "repeated" line if a minute's window ended during the flood on a slow machine.
    for lines, component in ((gateway_lines, "gateway"), (clustering_lines, "clustering")):
        firsts = [r for r in lines if r["msg"] == "security event"]
        assert len(firsts) == 1, lines
        assert firsts[0]["component"] == component and firsts[0]["event"] == "authentication_failed", firsts
        repeated = [r for r in lines if r["msg"] == "security event repeated"]
        assert len(repeated) <= 2 and sum(r["repeats"] for r in repeated) <= FLOOD - 1, lines
    assert clustering_lines[0]["principal"] == "svc:privacy"   # the claimed principal, named
