"""Each role against every route through the real gateway, and every role against every
RPC straight at the services (defence in depth), exactly as the matrix says. Direct gRPC
calls without, or with a forged, principal are refused."""

from __future__ import annotations

import importlib
import re
import time

import grpc
import httpx
import pytest

from hearth.common.v1 import common_pb2
from hearth.clustering.v1 import clustering_pb2 as cpb
from hearth.clustering.v1 import clustering_pb2_grpc as cpb_grpc
from services.common import identity, permissions
from services.common.identity import Principal, Role
from services.common.service_keys import ComponentTokenSigner
from tests.helpers.mesh_calls import VouchingSigner

SERVICES = ("clustering", "attribution", "privacy", "feedback")
DATA_HOLDERS = ("clustering", "attribution", "feedback")


def served_routes(security_mesh) -> list[str]:
    schema = httpx.get(security_mesh.url + "/openapi.json", timeout=10).json()
    return sorted(f"{method.upper()} {path}" for path, operations in schema["paths"].items()
                  if path.startswith("/v1/") for method in operations)


def test_every_route_in_the_matrix_is_served_and_every_served_route_is_in_the_matrix(security_mesh):
    served = {permissions.normalize_route(r) for r in served_routes(security_mesh)}
    in_matrix = {permissions.normalize_route(r) for r in permissions.ROUTES}
    assert served - in_matrix == set(), "served but not in the matrix (refused for everyone)"
    assert in_matrix - served == set(), "in the matrix but not served by the gateway yet"


def _request(client: httpx.Client, route: str) -> httpx.Response:
    method, path = route.split(" ", 1)
    path = re.sub(r"\{[^}]*\}", "sec-matrix-1", path)
    if method in ("POST", "PUT", "PATCH"):
        return client.request(method, path, json={})
    return client.request(method, path)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_each_role_gets_exactly_what_the_matrix_says_on_every_route(security_mesh, role):
    wrong = []
    with security_mesh.client(role) as client:
        for route in served_routes(security_mesh):
            permission = permissions.route_permission(route)
            response = _request(client, route)
            expected_allowed = permission is not None and permissions.client_may(role, permission)
            if expected_allowed and response.status_code in (401, 403):
                wrong.append(f"{route}: allowed but got {response.status_code} {response.text[:100]}")
            if not expected_allowed and response.status_code != 403:
                wrong.append(f"{route}: denied but got {response.status_code} {response.text[:100]}")
            if response.status_code == 403:
                assert response.json()["error"]["code"] == "permission_denied"
            assert response.status_code < 500 or response.status_code in (501, 503), (route, response.text)
    assert not wrong, "\n".join(wrong)


# --- straight at the services ----------------------------------------------------------

def _rpcs() -> list[tuple[str, str, object]]:
    out = []
    for name in SERVICES:
        module = importlib.import_module(f"hearth.{name}.v1.{name}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out.append((name, f"/{service.full_name}/{method.name}", method))
    data_holder = common_pb2.DESCRIPTOR.services_by_name["DataHolder"]
    for name in DATA_HOLDERS:  # the erasure contract, served beside each one's own API
        out += [(name, f"/{data_holder.full_name}/{m.name}", m) for m in data_holder.methods]
    return out


def _raw_call(channel: grpc.Channel, full_method: str, method_descriptor, metadata):
    """Call any RPC with an empty request (raw bytes: an empty message)."""
    identity_ = lambda b: b  # noqa: E731
    kind = (method_descriptor.client_streaming, method_descriptor.server_streaming)
    if kind == (False, False):
        return channel.unary_unary(full_method, identity_, identity_)(b"", metadata=metadata, timeout=10)
    if kind == (True, False):
        return channel.stream_unary(full_method, identity_, identity_)(iter([b""]), metadata=metadata, timeout=10)
    if kind == (False, True):
        return list(channel.unary_stream(full_method, identity_, identity_)(b"", metadata=metadata, timeout=10))
    return list(channel.stream_stream(full_method, identity_, identity_)(iter([b""]), metadata=metadata,
                                                                         timeout=10))


@pytest.fixture(scope="module")
def channels(security_mesh):
    opened = {name: grpc.insecure_channel(f"127.0.0.1:{port}")
              for name, port in security_mesh.mesh.grpc_ports.items()}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module")
def mesh_signer(security_mesh) -> VouchingSigner:
    """Signs like the mesh member that may vouch for each principal (the test holds every
    component's private key; each process holds only its own)."""
    return VouchingSigner(security_mesh.mesh)


def _metadata(signer, principal: Principal, audience: str = "clustering") -> list[tuple[str, str]]:
    """Signed metadata of a call to ``audience`` (``_get_household``'s clustering by default)."""
    return [(identity.PRINCIPAL_KEY, principal.id), (identity.ROLE_KEY, principal.role.value),
            (identity.TOKEN_KEY, signer.sign(principal, audience=audience))]


@pytest.mark.parametrize("role", [r for r in Role if r is not Role.ADMIN], ids=lambda r: r.value)
def test_services_refuse_every_rpc_the_role_lacks_even_with_a_valid_token(channels, mesh_signer, role):
    principal = Principal(f"sec-direct-{role.value}", role)
    wrong = []
    denied = 0
    for service, full_method, descriptor in _rpcs():
        if permissions.principal_allowed(principal, permissions.rpc_permission(full_method)):
            continue  # allowed calls would run the handler (e.g. Erase): not fired blindly here
        denied += 1
        try:
            _raw_call(channels[service], full_method, descriptor, _metadata(mesh_signer, principal, service))
            wrong.append(f"{full_method}: succeeded")
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                wrong.append(f"{full_method}: {exc.code().name}")
    assert denied > 0
    assert not wrong, "\n".join(wrong)


def test_an_allowed_role_passes_the_service_checks(channels, mesh_signer):
    stub = cpb_grpc.ClusteringServiceStub(channels["clustering"])
    principal = Principal("sec-direct-ds", Role.DATA_SCIENTIST)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetHousehold(cpb.GetHouseholdRequest(account_id="sec-direct-nobody"),
                          metadata=_metadata(mesh_signer, principal), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _get_household(channels, metadata):
    stub = cpb_grpc.ClusteringServiceStub(channels["clustering"])
    with pytest.raises(grpc.RpcError) as info:
        stub.GetHousehold(cpb.GetHouseholdRequest(account_id="sec-direct-nobody"), metadata=metadata, timeout=10)
    return info.value.code()


def test_no_principal_is_refused(channels):
    assert _get_household(channels, None) == grpc.StatusCode.UNAUTHENTICATED


def test_a_principal_without_a_token_is_refused(channels):
    metadata = [(identity.PRINCIPAL_KEY, "sec-admin"), (identity.ROLE_KEY, "admin")]
    assert _get_household(channels, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_forged_with_another_key_is_refused(channels):
    forger = ComponentTokenSigner.ephemeral(300.0)   # a key of no component of this mesh
    assert _get_household(channels, _metadata(forger, Principal("sec-admin", Role.ADMIN))) == \
        grpc.StatusCode.UNAUTHENTICATED


def test_a_valid_token_with_an_escalated_role_is_refused(channels, mesh_signer):
    metadata = _metadata(mesh_signer, Principal("sec-analyst", Role.ANALYST))
    metadata = [(k, "admin" if k == identity.ROLE_KEY else v) for k, v in metadata]
    assert _get_household(channels, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_an_expired_token_is_refused(channels, mesh_signer):
    principal = Principal("sec-admin", Role.ADMIN)
    old = int(time.time()) - 3600
    metadata = [(identity.PRINCIPAL_KEY, principal.id), (identity.ROLE_KEY, "admin"),
                (identity.TOKEN_KEY, mesh_signer.sign(principal, exp=old, audience="clustering"))]
    assert _get_household(channels, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_every_service_refuses_an_unsigned_principal(channels):
    metadata = [(identity.PRINCIPAL_KEY, "sec-admin"), (identity.ROLE_KEY, "admin")]
    by_service = {}
    for service, full_method, descriptor in _rpcs():
        if service in by_service:
            continue
        try:
            _raw_call(channels[service], full_method, descriptor, metadata)
            by_service[service] = "OK"
        except grpc.RpcError as exc:
            by_service[service] = exc.code().name
    assert by_service == {s: "UNAUTHENTICATED" for s in SERVICES}


def test_a_token_minted_for_one_service_is_refused_by_every_other(channels, mesh_signer):
    """Tokens name their audience (session 19): one captured on its way to clustering (an
    admin's, forwarded by the gateway) replayed at privacy, or any other pair, is
    UNAUTHENTICATED; at the service it was minted for it still passes authentication."""
    admin = Principal("sec-admin", Role.ADMIN)
    first_rpc = {}
    for service, full_method, descriptor in _rpcs():
        first_rpc.setdefault(service, (full_method, descriptor))
    wrong = []
    for minted_for in SERVICES:
        for sent_to in SERVICES:
            full_method, descriptor = first_rpc[sent_to]
            try:
                _raw_call(channels[sent_to], full_method, descriptor, _metadata(mesh_signer, admin, minted_for))
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            if (code == "UNAUTHENTICATED") != (minted_for != sent_to):
                wrong.append(f"minted for {minted_for}, sent to {sent_to} {full_method}: {code}")
    assert not wrong, "\n".join(wrong)
    assert _get_household(channels, _metadata(mesh_signer, admin, "privacy")) == grpc.StatusCode.UNAUTHENTICATED
    assert _get_household(channels, _metadata(mesh_signer, admin, "clustering")) == grpc.StatusCode.NOT_FOUND


def test_a_privacy_token_for_one_data_holder_does_not_erase_at_another(channels, mesh_signer):
    """svc:privacy's Erase token for clustering, replayed at attribution or feedback."""
    from hearth.common.v1 import common_pb2_grpc

    request = common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="sec-erase-aud", household=True),
                                      job_id="sec-erase-aud-job")
    for service in DATA_HOLDERS:
        minted_for = "clustering" if service != "clustering" else "feedback"
        with pytest.raises(grpc.RpcError) as info:
            common_pb2_grpc.DataHolderStub(channels[service]).Erase(
                request, metadata=_metadata(mesh_signer, identity.service_principal("privacy"), minted_for), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, service


def test_svc_privacy_signed_with_the_gateways_key_is_refused_by_every_data_holder(channels, security_mesh):
    """A key per component (session 19): a compromised gateway signs svc:privacy with the
    only private key it holds, its own; no data holder lets that Erase (nor authenticates
    it: UNAUTHENTICATED, reason signer_may_not_vouch), while privacy's own key still does."""
    from hearth.common.v1 import common_pb2_grpc

    gateway, privacy = security_mesh.mesh.signer("gateway"), security_mesh.mesh.signer("privacy")
    request = common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="sec-erase-gw", household=True),
                                      job_id="sec-erase-gw-job")
    for service in DATA_HOLDERS:
        stub = common_pb2_grpc.DataHolderStub(channels[service])
        for principal in (identity.service_principal("privacy"), identity.service_principal(service)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Erase(request, metadata=_metadata(gateway, principal, service), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (service, principal)
        stub.Erase(request, metadata=_metadata(privacy, identity.service_principal("privacy"), service), timeout=30)
    # Nor for any other service's principal (here svc:clustering at clustering).
    assert _get_household(channels, _metadata(gateway, identity.service_principal("clustering"))) == \
        grpc.StatusCode.UNAUTHENTICATED


def test_a_service_role_client_vouched_for_by_the_gateway_gets_no_data_key(channels, security_mesh):
    """The gateway vouches for API-key clients in the service role (ingestion pipelines),
    so a compromised gateway can sign any such principal. Until session 19 the service role
    held use_data_key: that token fetched any household's data key from privacy. Now only
    the stores that encrypt (svc:clustering, svc:attribution, signed with their own keys) get one."""
    from hearth.privacy.v1 import privacy_pb2 as ppb, privacy_pb2_grpc as ppb_grpc

    keys = ppb_grpc.KeysStub(channels["privacy"])
    request = ppb.GetDataKeyRequest(account_id="sec-datakey-acct")
    gateway = security_mesh.mesh.signer("gateway")
    for principal in (identity.Principal("ingest-pipeline", identity.Role.SERVICE),
                      identity.Principal("eve", identity.Role.SERVICE)):
        with pytest.raises(grpc.RpcError) as info:
            keys.GetDataKey(request, metadata=_metadata(gateway, principal, "privacy"), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, principal
    clustering = security_mesh.mesh.signer("clustering")
    assert keys.GetDataKey(request, metadata=_metadata(clustering, identity.service_principal("clustering"), "privacy"),
                           timeout=10).dek


def test_a_service_role_client_vouched_for_by_the_gateway_reads_no_consent(channels, security_mesh):
    """An API key is bound to a principal and a role, no account; until session 34 the
    service role's (an ingest pipeline's) read any account's consent, over HTTP and, with a
    token the gateway signs for it, straight at privacy. Now only the data holders that
    enforce consent (svc:clustering, svc:attribution, svc:feedback, each signed with its own
    key) and the people's roles that set it read it."""
    from hearth.privacy.v1 import privacy_pb2 as ppb, privacy_pb2_grpc as ppb_grpc

    consent = ppb_grpc.ConsentStub(channels["privacy"])
    one = ppb.GetConsentRequest(account_id="sec-consent-acct")
    many = ppb.GetConsentsRequest(account_ids=["sec-consent-acct", "sec-consent-other"])
    gateway = security_mesh.mesh.signer("gateway")
    for principal in (identity.Principal("ingest-pipeline", identity.Role.SERVICE),
                      identity.Principal("sec-service", identity.Role.SERVICE)):
        for call, request in ((consent.GetConsent, one), (consent.GetConsents, many)):
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=_metadata(gateway, principal, "privacy"), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (principal, call)
    for name in ("clustering", "attribution", "feedback"):
        signer = security_mesh.mesh.signer(name)
        answer = consent.GetConsent(one, metadata=_metadata(signer, identity.service_principal(name), "privacy"),
                                    timeout=10)
        assert answer.processing and not answer.known
        assert len(consent.GetConsents(many, metadata=_metadata(signer, identity.service_principal(name), "privacy"),
                                       timeout=10).accounts) == 2
    officer = identity.Principal("sec-privacy_officer", identity.Role.PRIVACY_OFFICER)
    assert consent.GetConsent(one, metadata=_metadata(gateway, officer, "privacy"), timeout=10).processing


def test_the_gateway_process_holds_only_its_own_signing_key(channels, security_mesh):
    """What the real gateway process can sign with: the one private key its environment
    names (the gateway's, in the keyset as the gateway's), no shared mesh secret, no other
    component's key file; a svc:privacy token made with it is refused at every data holder."""
    from hearth.common.v1 import common_pb2_grpc
    from pathlib import Path

    from services.common import service_keys

    pid = security_mesh.mesh.processes["gateway"].pid
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    assert "HEARTH_SERVICE_TOKEN_KEY" not in env
    key_file = Path(env["HEARTH_SERVICE_SIGNING_KEY_FILE"])
    keyset = service_keys.load_keyset(env["HEARTH_SERVICE_PUBLIC_KEYS_FILE"])
    signer = service_keys.ComponentTokenSigner(service_keys.load_private_key(key_file), keyset, 300.0)
    assert signer.component == "gateway"
    others = {str(p) for name, p in security_mesh.mesh.service_keys().items() if name not in ("gateway", "keyset")}
    assert not others & set(env.values())
    request = common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="sec-erase-gw", household=True),
                                      job_id="sec-erase-gw-proc")
    for service in DATA_HOLDERS:
        with pytest.raises(grpc.RpcError) as info:
            common_pb2_grpc.DataHolderStub(channels[service]).Erase(
                request, metadata=_metadata(signer, identity.service_principal("privacy"), service), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, service


def test_only_the_privacy_service_may_erase_at_a_data_holder(channels, mesh_signer):
    """A token captured on the cluster network (an admin's, forwarded by the gateway; a
    service's, on each of its calls) replayed straight at a data holder must not erase:
    until session 18 admin and every service principal could call DataHolder/Erase."""
    from hearth.common.v1 import common_pb2_grpc

    request = common_pb2.EraseRequest(scope=common_pb2.ErasureScope(account_id="sec-erase-nobody", household=True),
                                      job_id="sec-erase-job")
    for service in DATA_HOLDERS:
        stub = common_pb2_grpc.DataHolderStub(channels[service])
        for principal in (Principal("sec-admin", Role.ADMIN), identity.service_principal("feedback"),
                          identity.service_principal("attribution"), identity.service_principal("gateway"),
                          identity.service_principal("clustering")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Erase(request, metadata=_metadata(mesh_signer, principal, service), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (service, principal)
        stub.Erase(request, metadata=_metadata(mesh_signer, identity.service_principal("privacy"), service),
                   timeout=30)
