"""`make certs` output and mutual TLS between a client and a real service server:
a mesh certificate is required, and it names the component calling — on its own it lets
that component act as itself only (no keys configured in this process); a person, or
another component's principal, still needs a token (session 20)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from hearth.privacy.v1 import privacy_pb2 as ppb
from hearth.privacy.v1 import privacy_pb2_grpc as ppb_grpc
from services.common import config, identity, tls
from services.common.config import ConfigError
from services.common.server import build_server

ROOT = Path(__file__).resolve().parents[3]


def _certs_module():
    spec = importlib.util.spec_from_file_location("hearth_certs_script", ROOT / "scripts" / "certs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    module = _certs_module()
    mesh_dir = tmp_path_factory.mktemp("certs")
    module.generate(mesh_dir, ("privacy", "gateway", "clustering", "nobody"))
    other_dir = tmp_path_factory.mktemp("other-ca")
    module.generate(other_dir, ("intruder",))
    return mesh_dir, other_dir


def material(directory: Path, name: str, ca_dir: Path | None = None) -> tls.TlsMaterial:
    return material_from_env({tls.CERT_ENV: str(directory / f"{name}.pem"),
                              tls.KEY_ENV: str(directory / f"{name}-key.pem"),
                              tls.CA_ENV: str((ca_dir or directory) / "ca.pem")})


def material_from_env(env: dict[str, str]) -> tls.TlsMaterial | None:
    """What a process reads at start from these variables (config.configure_process)."""
    blank = {tls.CERT_ENV: "", tls.KEY_ENV: "", tls.CA_ENV: "", tls.SERVER_NAME_ENV: ""}
    return tls.material_from_settings(config.settings_from({**blank, **env}))


def test_certificates_chain_to_the_ca_and_serve_both_ends(certs):
    mesh_dir, _ = certs
    ca = x509.load_pem_x509_certificate((mesh_dir / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((mesh_dir / "privacy.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usages} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "privacy", "hearth-privacy"} <= set(names.get_values_for_type(x509.DNSName))
    assert oct((mesh_dir / "privacy-key.pem").stat().st_mode & 0o777) == "0o600"


def test_rerunning_keeps_the_ca_and_existing_certificates(certs, tmp_path):
    module = _certs_module()
    module.generate(tmp_path, ("a",))
    ca_before, a_before = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "a.pem").read_bytes()
    module.generate(tmp_path, ("a", "b"))
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    assert (tmp_path / "a.pem").read_bytes() == a_before
    assert (tmp_path / "b.pem").exists()


def test_partial_or_unreadable_tls_configuration_names_the_variable(tmp_path):
    assert material_from_env({}) is None
    with pytest.raises(ConfigError, match="HEARTH_TLS_CA"):
        material_from_env({tls.CERT_ENV: "a", tls.KEY_ENV: "b"})
    with pytest.raises(ConfigError, match="HEARTH_TLS_CERT"):
        material_from_env({tls.CERT_ENV: str(tmp_path / "nope.pem"), tls.KEY_ENV: "b", tls.CA_ENV: "c"})
    (tmp_path / "x.pem").write_text("not pem")
    with pytest.raises(ConfigError, match="not a PEM"):
        material_from_env({tls.CERT_ENV: str(tmp_path / "x.pem"), tls.KEY_ENV: str(tmp_path / "x.pem"),
                               tls.CA_ENV: str(tmp_path / "x.pem")})


@pytest.fixture(scope="module")
def mtls_privacy(certs, tmp_path_factory):
    mesh_dir, _ = certs
    settings = config.load(service_name="privacy", data_dir=tmp_path_factory.mktemp("privacy"))
    module = importlib.import_module("services.privacy.__main__")
    servicers, closers = module.build(settings)

    def register(server):
        for add, servicer, _ in servicers:
            add(servicer, server)
        return [full for _, _, full in servicers]

    running = build_server("privacy", register, port=0,
                           credentials=tls.server_credentials(material(mesh_dir, "privacy")))
    running.on_stop.extend(closers)
    yield running
    running.stop(0)


UNSIGNED = [(identity.PRINCIPAL_KEY, "tls-admin"), (identity.ROLE_KEY, "admin")]


def call(channel: grpc.Channel, metadata=UNSIGNED):
    return ppb_grpc.ConsentStub(channel).GetConsent(
        ppb.GetConsentRequest(account_id=""), metadata=metadata, timeout=5)


@pytest.fixture(autouse=True)
def keyless_process():
    """This process signs with a random key of its own (no keys configured), as a mesh
    running on certificates alone would."""
    from services.common.service_keys import ComponentTokenSigner

    previous = identity._signer
    identity.configure_service_tokens(ComponentTokenSigner.ephemeral(300.0))
    yield
    identity.configure_service_tokens(previous)


def _code(mesh_dir: Path, port: int, cert: str, metadata) -> grpc.StatusCode:
    with tls.channel(f"localhost:{port}", material=material(mesh_dir, cert)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call(channel, metadata)
    return info.value.code()


def test_a_certificate_alone_lets_its_component_act_as_itself(certs, mtls_privacy):
    mesh_dir, _ = certs
    own = [(identity.PRINCIPAL_KEY, "svc:clustering"), (identity.ROLE_KEY, "service")]
    # Past authentication and the matrix: the service itself rejects the empty account id.
    assert _code(mesh_dir, mtls_privacy.port, "clustering", own) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_certificate_does_not_vouch_for_a_person_or_another_component(certs, mtls_privacy):
    """Until session 20 the admin below, sent from the gateway's certificate without a
    token, got INVALID_ARGUMENT: any mesh certificate forwarded any principal."""
    mesh_dir, _ = certs
    svc_privacy = [(identity.PRINCIPAL_KEY, "svc:privacy"), (identity.ROLE_KEY, "service")]
    assert _code(mesh_dir, mtls_privacy.port, "gateway", UNSIGNED) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(mesh_dir, mtls_privacy.port, "clustering", svc_privacy) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(mesh_dir, mtls_privacy.port, "clustering", UNSIGNED) == grpc.StatusCode.UNAUTHENTICATED
    # a certificate of the mesh CA that names no component identifies nobody
    own = [(identity.PRINCIPAL_KEY, "svc:nobody"), (identity.ROLE_KEY, "service")]
    assert _code(mesh_dir, mtls_privacy.port, "nobody", own) == grpc.StatusCode.UNAUTHENTICATED


def test_the_matrix_still_applies_to_a_verified_peer(certs, mtls_privacy):
    mesh_dir, _ = certs
    # this process's own token (in-process trust), from the gateway's certificate
    analyst = identity.Principal("tls-analyst", identity.Role.ANALYST).metadata("privacy")
    assert _code(mesh_dir, mtls_privacy.port, "gateway", analyst) == grpc.StatusCode.PERMISSION_DENIED


def test_without_a_client_certificate_the_handshake_fails(certs, mtls_privacy):
    mesh_dir, _ = certs
    credentials = grpc.ssl_channel_credentials(root_certificates=(mesh_dir / "ca.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{mtls_privacy.port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call(channel, identity.Principal("tls-admin", identity.Role.ADMIN).metadata("privacy"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(certs, mtls_privacy):
    mesh_dir, other_dir = certs
    intruder = tls.TlsMaterial(cert=(other_dir / "intruder.pem").read_bytes(),
                               key=(other_dir / "intruder-key.pem").read_bytes(),
                               ca=(mesh_dir / "ca.pem").read_bytes())
    with tls.channel(f"localhost:{mtls_privacy.port}", material=intruder) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_to_a_tls_server_fails(mtls_privacy):
    with grpc.insecure_channel(f"localhost:{mtls_privacy.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            call(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
