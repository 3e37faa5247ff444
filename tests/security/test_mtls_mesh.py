"""A mesh of real processes with mutual TLS and one certificate per process (as `make
certs` writes and the chart mounts, one Secret per component): a certificate names the
component calling and does not replace the signed token.

Until session 20 a verified peer forwarded any principal without a token, and the chart
mounted one mesh certificate in every pod: any pod could claim ``svc:privacy`` (and erase
any household at a data holder) or any person."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hearth.common.v1 import common_pb2, common_pb2_grpc
from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common import identity, tls
from services.common.identity import Principal, Role
from services.testing.mesh import running_mesh
from tests.helpers.waiting import deletion_job

DATA_HOLDERS = ("clustering", "attribution", "feedback")
SERVICES = (*DATA_HOLDERS, "privacy")


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("mtls-mesh")
    with running_mesh(base, {"mtls-admin": "admin"}, tls_dir=base / "certs",
                      more_ports={s: ("HEARTH_HEALTH_PORT",) for s in SERVICES}) as mesh:
        mesh.health_ports = {s: mesh.port_of(s, "HEARTH_HEALTH_PORT") for s in SERVICES}
        yield mesh


def channel_as(mesh, component: str, service: str) -> grpc.Channel:
    """A channel to ``service`` presenting ``component``'s certificate (that process's)."""
    env = mesh.tls_env(component)
    material = tls.TlsMaterial(*(open(env[k], "rb").read() for k in ("HEARTH_TLS_CERT", "HEARTH_TLS_KEY",
                                                                        "HEARTH_TLS_CA")))
    return tls.channel(f"127.0.0.1:{mesh.grpc_ports[service]}", material=material)


def metadata(principal: Principal, signer=None, audience: str = "") -> list[tuple[str, str]]:
    md = [(identity.PRINCIPAL_KEY, principal.id), (identity.ROLE_KEY, principal.role.value)]
    if signer is not None:
        md.append((identity.TOKEN_KEY, signer.sign(principal, audience=audience)))
    return md


def erase(channel: grpc.Channel, md, job: str):
    request = common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="mtls-erase", household=True),
                                      job_id=job)
    return common_pb2_grpc.DataHolderStub(channel).Erase(request, metadata=md, timeout=30)


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def auth_failures(mesh, service: str, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.metrics_ports[service]}/metrics", timeout=10).text
    line = f'hearth_auth_failures_total{{component="{service}",reason="{reason}"}}'
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def test_the_mesh_serves_over_mutual_tls_with_a_certificate_per_process(tls_mesh):
    """The legitimate calls: the gateway forwards a person to each service, and a deletion
    job (privacy's svc:privacy Erase at every data holder) completes."""
    with httpx.Client(base_url=tls_mesh.url, headers={"X-API-Key": tls_mesh.api_key}, timeout=30) as client:
        assert client.get("/health").json()["status"] == "SERVING"
        assert client.put("/v1/consent/mtls-acct", json={"processing": True, "attribution": False}).status_code == 200
        assert client.get("/v1/household/mtls-acct").status_code in (200, 404)
        job = client.post("/v1/delete", json={"scope": {"kind": "household", "account_id": "mtls-acct"},
                                              "reason": "gdpr_art17"})
        assert job.status_code == 202, job.text
        body = deletion_job(client, job.json()["job_id"])
    assert body["state"] == "completed", body
    assert {s["service"] for s in body["services"] if s["confirmed"]} >= set(DATA_HOLDERS)


def test_clusterings_certificate_claiming_svc_privacy_is_refused_at_every_data_holder(tls_mesh):
    privacy = identity.service_principal("privacy")
    privacy_key = tls_mesh.signer("privacy")
    for holder in DATA_HOLDERS:
        before = auth_failures(tls_mesh, holder, "certificate_not_signer")
        with channel_as(tls_mesh, "clustering", holder) as channel:
            # no token: the certificate alone proved nothing about svc:privacy (was OK)
            assert code_of(lambda: erase(channel, metadata(privacy), "mtls-a")) == grpc.StatusCode.UNAUTHENTICATED, holder
            # a valid svc:privacy token, captured on the network and replayed from clustering's pod
            captured = metadata(privacy, privacy_key, holder)
            assert code_of(lambda: erase(channel, captured, "mtls-b")) == grpc.StatusCode.UNAUTHENTICATED, holder
        assert auth_failures(tls_mesh, holder, "certificate_not_signer") == before + 1, holder
        with channel_as(tls_mesh, "privacy", holder) as channel:   # the privacy process's own: served
            erase(channel, metadata(privacy, privacy_key, holder), "mtls-c")


def test_a_person_without_a_token_over_mutual_tls_is_refused(tls_mesh):
    admin = Principal("mtls-admin", Role.ADMIN)
    request = ppb.GetConsentRequest(account_id="mtls-acct")
    for component in ("gateway", "clustering", "privacy"):
        with channel_as(tls_mesh, component, "privacy") as channel:
            stub = ppb_grpc.ConsentStub(channel)
            assert code_of(lambda: stub.GetConsent(request, metadata=metadata(admin), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED, component
    gateway_key = tls_mesh.signer("gateway")
    with channel_as(tls_mesh, "gateway", "privacy") as channel:
        ppb_grpc.ConsentStub(channel).GetConsent(request, metadata=metadata(admin, gateway_key, "privacy"), timeout=10)
    with channel_as(tls_mesh, "clustering", "privacy") as channel:   # the gateway's token from another pod
        stub = ppb_grpc.ConsentStub(channel)
        assert code_of(lambda: stub.GetConsent(request, metadata=metadata(admin, gateway_key, "privacy"),
                                               timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_kubelets_plaintext_probe_gets_health_and_nothing_else(tls_mesh):
    """Kubernetes' gRPC probes take no TLS parameters: against the service port (mutual
    TLS) they never complete a handshake, so until session 20 no service pod of a release
    with mesh TLS became ready. HEARTH_HEALTH_PORT serves grpc.health alone in plaintext."""
    check = health_pb2.HealthCheckRequest(service="")
    for service in SERVICES:
        with grpc.insecure_channel(f"127.0.0.1:{tls_mesh.grpc_ports[service]}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert code_of(lambda: stub.Check(check, timeout=5)) == grpc.StatusCode.UNAVAILABLE, service
        with grpc.insecure_channel(f"127.0.0.1:{tls_mesh.health_ports[service]}") as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(check, timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING, service
            if service in DATA_HOLDERS:   # no Hearth RPC there, even with a valid token
                md = metadata(identity.service_principal("privacy"), tls_mesh.signer("privacy"), service)
                assert code_of(lambda: erase(channel, md, "mtls-h")) == grpc.StatusCode.UNIMPLEMENTED, service
