"""The Envoy edge's authorization hop through real processes (no Envoy binary can be
installed here, so the test plays Envoy's ext_authz part): the gateway's
/v1/edge/authorize/<gRPC path> authenticates the caller and checks the permission
matrix; the metadata it answers with is exactly what a service needs to accept the
call Envoy then makes straight to it."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from hearth.feedback.v1 import feedback_pb2 as fpb
from hearth.feedback.v1 import feedback_pb2_grpc as fpb_grpc
from services.common.identity import PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY
from services.testing.mesh import running_mesh

GET_HOUSEHOLD = "/hearth.clustering.v1.ClusteringService/GetHousehold"
SET_FLAG = "/hearth.feedback.v1.FeedbackService/SetFlag"
GET_EXPERIMENT = "/hearth.feedback.v1.FeedbackService/GetExperiment"


@pytest.fixture(scope="module")
def edge_mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("edge-mesh")
    with running_mesh(base, {"ops-alice": "admin", "analyst-bob": "analyst", "pipeline-1": "service"}, timeout_s=120,
                      more_ports={"gateway": ("HEARTH_EDGE_AUTHORIZER_PORT",)}) as mesh:
        mesh.analyst_key = mesh.keys["analyst-bob"]
        mesh.authorizer_url = f"http://127.0.0.1:{mesh.port_of('gateway', 'HEARTH_EDGE_AUTHORIZER_PORT')}"
        yield mesh


def _authorize(mesh, path: str, headers: dict[str, str]) -> httpx.Response:
    # Envoy's ext_authz HTTP service: the original method (POST for gRPC) and path,
    # appended to the configured path_prefix, with the allowed client headers; on the
    # authorizer's own port (HEARTH_EDGE_AUTHORIZER_PORT), which only Envoy reaches.
    return httpx.post(f"{mesh.authorizer_url}/v1/edge/authorize{path}", headers=headers, timeout=30)


def test_the_public_port_never_serves_the_authorizer_nor_its_port_anything_else(edge_mesh):
    """Until session 19 the authorizer was a route of the public port: any authenticated
    client could fetch a mesh token (x-hearth-token) for itself and call a service port
    directly, past the gateway's rate limits. Now it is served on its own listener only."""
    mesh = edge_mesh
    admin = {"X-API-Key": mesh.api_key}
    for method in ("POST", "GET"):
        public = httpx.request(method, f"{mesh.url}/v1/edge/authorize{GET_HOUSEHOLD}", headers=admin, timeout=30)
        assert public.status_code == 404, public.text
        assert TOKEN_KEY not in public.headers and PRINCIPAL_KEY not in public.headers
        assert public.json()["error"]["code"] == "not_found"
    # The public port still serves its routes...
    assert httpx.get(f"{mesh.url}/v1/household/edge-public", headers=admin, timeout=30).status_code in (200, 404)
    assert httpx.get(f"{mesh.url}/health", timeout=30).status_code in (200, 503)
    # ...and the authorizer's port serves the authorizer only.
    assert _authorize(mesh, GET_HOUSEHOLD, admin).status_code == 200
    for path in ("/v1/household/edge-public", "/health", "/openapi.json", "/v1/edge/authorize"):
        other = httpx.get(f"{mesh.authorizer_url}{path}", headers=admin, timeout=30)
        assert other.status_code == 404, (path, other.text)


def test_authorized_metadata_lets_the_direct_call_through(edge_mesh):
    mesh = edge_mesh
    answer = _authorize(mesh, GET_HOUSEHOLD, {"X-API-Key": mesh.api_key})
    assert answer.status_code == 200, answer.text
    metadata = [(k, answer.headers[k]) for k in (PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY)]
    assert dict(metadata)[PRINCIPAL_KEY] == "ops-alice" and dict(metadata)[ROLE_KEY] == "admin"
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['clustering']}") as channel:
        stub = cpb_grpc.ClusteringServiceStub(channel)
        request = cpb.GetHouseholdRequest(account_id="edge-unknown-household")
        # Without the authorizer's metadata the service refuses the call...
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetHousehold(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # ...with it, the call is served (an unknown household is NOT_FOUND, not refused).
        with pytest.raises(grpc.RpcError) as served:
            stub.GetHousehold(request, metadata=metadata, timeout=30)
        assert served.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_permission_matrix_decides_per_rpc(edge_mesh):
    mesh = edge_mesh
    analyst = {"X-API-Key": mesh.analyst_key}
    allowed = _authorize(mesh, GET_EXPERIMENT, analyst)
    assert allowed.status_code == 200, allowed.text
    with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_ports['feedback']}") as channel:
        metadata = [(k, allowed.headers[k]) for k in (PRINCIPAL_KEY, ROLE_KEY, TOKEN_KEY)]
        reply = fpb_grpc.FeedbackServiceStub(channel).GetExperiment(fpb.GetExperimentRequest(), metadata=metadata,
                                                                    timeout=30)
        assert reply.traffic  # the split, control included
    denied = _authorize(mesh, SET_FLAG, analyst)
    assert denied.status_code == 403, denied.text
    assert PRINCIPAL_KEY not in denied.headers and TOKEN_KEY not in denied.headers
    # A data key goes to the stores only: not even an admin gets it through the edge.
    internal = _authorize(mesh, "/hearth.privacy.v1.Keys/GetDataKey", {"X-API-Key": mesh.api_key})
    assert internal.status_code == 403 and TOKEN_KEY not in internal.headers


@pytest.mark.parametrize("path, headers, status", [
    (GET_HOUSEHOLD, {}, 401),
    (GET_HOUSEHOLD, {"X-API-Key": "hk_not-a-key"}, 401),
    ("/hearth.clustering.v1.ClusteringService/NoSuchMethod", None, 403),
    ("/not-a-grpc-path", None, 422),
    ("/not-a-grpc-path", {}, 401),
    ("/hearth.clustering.v1.ClusteringService/GetHousehold/extra", None, 422),
])
def test_bad_requests_get_no_token(edge_mesh, path, headers, status):
    answer = _authorize(edge_mesh, path, {"X-API-Key": edge_mesh.api_key} if headers is None else headers)
    assert answer.status_code == status, answer.text
    assert TOKEN_KEY not in answer.headers


def test_refusals_are_audited_as_the_gateways_and_unknown_methods_make_no_metric_labels(edge_mesh):
    """Until session 19 an authorizer refusal was reported with the RPC's service as its
    component, so the gateway's audit listener skipped it (never audited), and an unknown
    method's name became a label value of hearth_access_denied_total (any name a client
    routed through Envoy chose)."""
    mesh = edge_mesh
    analyst = {"X-API-Key": mesh.analyst_key}
    assert _authorize(mesh, SET_FLAG, analyst).status_code == 403
    made_up = "/hearth.clustering.v1.ClusteringService/MadeUpMethodXyzzy"
    assert _authorize(mesh, made_up, analyst).status_code == 403
    admin = {"X-API-Key": mesh.api_key}
    target = f"route:rpc {SET_FLAG}"
    deadline = time.monotonic() + 60
    records: list = []
    while time.monotonic() < deadline:
        page = httpx.get(f"{mesh.url}/v1/audit", headers=admin, timeout=30,
                         params={"event_type": "permission_denied", "resource_prefix": target})
        assert page.status_code == 200, page.text
        records = page.json()["records"]
        if records:
            break
        time.sleep(0.5)
    assert records and records[0]["principal"] == "analyst-bob", records
    metrics = httpx.get(f"http://127.0.0.1:{mesh.gateway_metrics_port}/metrics", timeout=30).text
    assert "MadeUpMethodXyzzy" not in metrics
    assert 'hearth_access_denied_total{component="gateway",role="analyst",target="rpc <not in the matrix>"}' in metrics


@pytest.mark.parametrize("path", [
    "/hearth.privacy.v1.AuditLog/AppendAudit", "/hearth.feedback.v1.FeedbackService/RecordPrediction",
    "/hearth.privacy.v1.Consent/GetConsent", "/hearth.clustering.v1.ClusteringService/IngestEvents", GET_HOUSEHOLD])
def test_a_service_role_api_key_gets_no_token_for_any_rpc(edge_mesh, path):
    """The edge is for clients: an API key in the service role (an ingest pipeline's) is refused
    every RPC, even one its role holds (IngestEvents, GetHousehold, AppendAudit), 403 and no
    token — its calls go through the gateway's routes, where the gateway signs for it and the
    client never holds the token. Held since the edge's first commit (0cbfe4b) but by no test,
    while docs/security.md's attack34 review described AppendAudit / RecordPrediction through
    the edge as an ingest pipeline's path (review34)."""
    answer = _authorize(edge_mesh, path, {"X-API-Key": edge_mesh.keys["pipeline-1"]})
    assert answer.status_code == 403, answer.text
    assert "service principals do not call through the edge" in answer.json()["error"]["message"], answer.text
    assert TOKEN_KEY not in answer.headers and PRINCIPAL_KEY not in answer.headers
