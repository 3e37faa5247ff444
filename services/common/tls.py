"""Mutual TLS between the mesh's processes, when certificates are configured.

Variables (all three or none; ``make certs`` writes a development set under ./certs/)::

    HEARTH_TLS_CERT   this process's certificate (PEM), used as server AND client cert
    HEARTH_TLS_KEY    its private key (PEM)
    HEARTH_TLS_CA     the CA that signed every mesh certificate (PEM)
    HEARTH_TLS_SERVER_NAME  optional: the name to verify in a peer's certificate when
                      the address is not one of its names (e.g. dialling an IP)

With them, a service listens with TLS and *requires* a client certificate signed by the
CA, and the certificate names the component the peer is (``peer_component``: ``hearth-<c>``
among its subject alternative names, or, without those, ``<c>`` as its common name). The certificate does not replace the
signed service token: with component keys configured every call's token is verified as
without TLS, and its signer must be the component the certificate names; without keys, a
peer may act as its own ``svc:<c>`` on its certificate alone and nothing else
(``identity.principal_from_metadata``; docs/security.md, "Service-to-service
authentication"). Without them, services listen in plaintext and every
call must carry a signed service token (``services.common.identity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

CERT_ENV, KEY_ENV, CA_ENV = "HEARTH_TLS_CERT", "HEARTH_TLS_KEY", "HEARTH_TLS_CA"
SERVER_NAME_ENV = "HEARTH_TLS_SERVER_NAME"


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of this process's certificate chain, key and the mesh CA."""

    cert: bytes
    key: bytes
    ca: bytes
    server_name: str = ""


def material_from_settings(settings) -> TlsMaterial | None:
    """Read the three files ``settings`` (``config.MeshSettings``) names, or ``None``
    when none is set. A partial or unreadable configuration raises ConfigError naming
    the variable."""
    from services.common.config import ConfigError

    paths = {CERT_ENV: settings.tls_cert, KEY_ENV: settings.tls_key, CA_ENV: settings.tls_ca}
    if not any(paths.values()):
        return None
    missing = [name for name, value in paths.items() if not value]
    if missing:
        raise ConfigError("invalid configuration:\n" + "\n".join(
            f"  {name}: required when any of {CERT_ENV}/{KEY_ENV}/{CA_ENV} is set" for name in missing))
    data = {}
    for name, value in paths.items():
        try:
            data[name] = Path(value).read_bytes()
        except OSError as exc:
            raise ConfigError(f"invalid configuration:\n  {name}: cannot read {value}: {exc.strerror}") from None
        if b"-----BEGIN" not in data[name]:
            raise ConfigError(f"invalid configuration:\n  {name}: {value} is not a PEM file")
    return TlsMaterial(data[CERT_ENV], data[KEY_ENV], data[CA_ENV], settings.tls_server_name)


# What the bootstrap configured (config.configure_process); until then, each use reads
# the mesh settings from the environment (a test or tool that built no bootstrap).
_configured: tuple[TlsMaterial | None, str, float, int, int] | None = None
RECONNECT_MAX_S = 5.0   # config.MeshSettings.grpc_reconnect_max_s's default
# config.MeshSettings.grpc_max_message_bytes's default: the largest request message a
# server reads (and a client sends). Responses stay at RESPONSE_MAX_BYTES.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# What a client accepts and a server sends (config.MeshSettings.grpc_max_response_bytes's
# default). Until session 26 a household's export was one response message and had to
# fit; it is streamed in chunks now (export_stream.py).
RESPONSE_MAX_BYTES = 64 * 1024 * 1024


def configure(material: TlsMaterial | None, lb_policy: str = "pick_first",
              reconnect_max_s: float = RECONNECT_MAX_S, max_message_bytes: int = MAX_MESSAGE_BYTES,
              max_response_bytes: int = RESPONSE_MAX_BYTES) -> None:
    global _configured
    _configured = (material, lb_policy, reconnect_max_s, max_message_bytes, max_response_bytes)


def _current() -> tuple[TlsMaterial | None, str, float, int, int]:
    if _configured is not None:
        return _configured
    from services.common.config import mesh_settings

    settings = mesh_settings()
    return (material_from_settings(settings), settings.grpc_lb_policy, settings.grpc_reconnect_max_s,
            settings.grpc_max_message_bytes, settings.grpc_max_response_bytes)


def max_message_bytes() -> int:
    """The largest request message this process's servers read and its clients send
    (HEARTH_GRPC_MAX_MESSAGE_BYTES)."""
    return _current()[3]


def response_max_bytes() -> int:
    """The largest response message this process's servers send and its clients read
    (HEARTH_GRPC_MAX_RESPONSE_BYTES)."""
    return _current()[4]


def current_material() -> TlsMaterial | None:
    """This process's TLS material (None: plaintext)."""
    return _current()[0]


def server_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """TLS that demands a client certificate signed by the mesh CA (mutual TLS)."""
    return grpc.ssl_server_credentials([(material.key, material.cert)],
                                       root_certificates=material.ca, require_client_auth=True)


def channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: verify the server against the CA, present our cert."""
    return grpc.ssl_channel_credentials(root_certificates=material.ca, private_key=material.key,
                                        certificate_chain=material.cert)


def _options(material: TlsMaterial | None, options: list[tuple[str, object]] | None) -> list:
    opts = list(options or [])
    if material is not None and material.server_name:
        opts.append(("grpc.ssl_target_name_override", material.server_name))
    return opts


def channel(address: str, options: list[tuple[str, object]] | None = None,
            material: TlsMaterial | None = None) -> grpc.Channel:
    """A blocking channel: mutual TLS when ``material`` (default: from the environment)
    is configured, else plaintext."""
    material = material if material is not None else current_material()
    if material is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(material), options=_options(material, options))


def aio_channel(address: str, options: list[tuple[str, object]] | None = None,
                material: TlsMaterial | None = None) -> grpc.aio.Channel:
    """The same for grpc.aio (the gateway)."""
    material = material if material is not None else current_material()
    if material is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, channel_credentials(material),
                                   options=_options(material, options))


def component_of_names(common_name: str, dns_names: list[str] | tuple[str, ...]) -> str:
    """The mesh component a certificate names: ``<c>`` when its DNS names hold
    ``hearth-<c>`` or its common name is ``<c>`` / ``hearth-<c>``, for exactly one
    component ``c`` of the mesh; "" when it names none or several (such a certificate
    identifies nobody)."""
    from services.common.service_keys import COMPONENTS

    named = {c for c in COMPONENTS if f"hearth-{c}" in dns_names or common_name in (c, f"hearth-{c}")}
    return next(iter(named)) if len(named) == 1 else ""


def peer_component(context: grpc.ServicerContext) -> str | None:
    """The component the peer's verified client certificate names, or ``None`` when the
    call came without TLS. A certificate with subject alternative names is read by them
    only (``hearth-<c>`` among them, as RFC 6125 reads names), one without by its common
    name (``<c>`` or ``hearth-<c>``): ``component_of_names``, "" when it names none or
    several. ``make certs`` writes one certificate per process (``hearth-<name>`` among
    its names); the chart mounts one Secret per component (docs/deploy.md, "Mesh TLS").

    Runs on every RPC: ``peer_identities`` (what gRPC verified: the SANs, else the
    common name) and a cache per certificate's names cost about 0.5 us plaintext and 3 us
    with TLS, against 2-3 us and 17-29 us for the whole ``auth_context`` (session 20,
    measured on the loaded 2-core machine; the check before, ``peer_identities`` alone,
    0.5 us)."""
    try:
        identities = context.peer_identities()
        if not identities:
            return None   # plaintext: no certificate (a TLS server requires one)
        key = (context.peer_identity_key(), *identities)
    except Exception:  # noqa: BLE001 - a context without auth information is not verified
        return None
    known = _PEER_COMPONENTS.get(key)
    if known is None:
        names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in identities]
        known = component_of_names(names[0], ()) if key[0] == "x509_common_name" else component_of_names("", names)
        if len(_PEER_COMPONENTS) > 1024:   # bounded: a mesh has a few certificates
            _PEER_COMPONENTS.clear()
        _PEER_COMPONENTS[key] = known
    return known


# (identity key, *identities) of a verified peer -> the component its certificate names.
_PEER_COMPONENTS: dict[tuple, str] = {}


# Channel options every Hearth client uses. HEARTH_GRPC_LB_POLICY=round_robin spreads
# calls over every address a name resolves to (a headless Kubernetes Service lists each
# pod; the chart sets it with mesh.clientSideBalancing), and the servers'
# max_connection_age makes clients re-resolve as replicas come and go. The default,
# pick_first, reconnects at once when its single backend restarts (round_robin fails
# fast while every backend is down), which suits one address per service (make run).
# Messages only in the identity encoding (bit 0 of the bitset), on the services' ports for
# requests and on every client channel for responses. gRPC's core inflates a compressed
# message whole — on a server before any interceptor, so before any credential is checked —
# and only then compares its size with grpc.max_receive_message_length: a 400 KB gzip of
# zeros sent to Health/Check without credentials took clustering from 102 to 487 MB
# resident (attack30); a peer answering 400 MiB of zeros as gzip took its caller from 28
# to 457 MB (attack31). No Hearth process compresses. A server refuses a compressed request
# (UNIMPLEMENTED, naming its encoding) before reading it; a client never inflates a
# compressed answer: the call fails, or, when the answer arrived whole before the refusal
# took effect, the stub is handed the raw compressed bytes (which gzip makes unparsable).
IDENTITY_ENCODING_ONLY = ("grpc.compression_enabled_algorithms_bitset", 1)


def channel_options() -> list[tuple[str, object]]:
    _, lb_policy, reconnect_max_s, max_request, max_response = _current()
    return [
        IDENTITY_ENCODING_ONLY,
        # Requests up to HEARTH_GRPC_MAX_MESSAGE_BYTES, which the servers read (a larger one
        # fails here, RESOURCE_EXHAUSTED, before a byte is sent); responses up to
        # HEARTH_GRPC_MAX_RESPONSE_BYTES (exports are streamed in smaller chunks).
        ("grpc.max_receive_message_length", max_response),
        ("grpc.max_send_message_length", max_request),
        ("grpc.lb_policy_name", lb_policy),
        # Reconnect attempts to a peer that is down back off 1 s x1.6 up to gRPC's default
        # 120 s, so a peer down for a minute could stay unused for another minute after it
        # came back; capped at HEARTH_GRPC_RECONNECT_MAX_S (5 s), a restarted peer is used
        # again within 5 s. The tests' meshes set 0.25 s: every process of a mesh starts at
        # once, and each would otherwise see the slower-starting ones seconds late.
        ("grpc.initial_reconnect_backoff_ms", round(1000 * min(1.0, reconnect_max_s))),
        ("grpc.max_reconnect_backoff_ms", round(1000 * reconnect_max_s)),
    ]
