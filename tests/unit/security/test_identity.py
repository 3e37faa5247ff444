"""Signed service tokens and principals in metadata: what a service accepts and refuses,
and that every refusal is reported."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.common import config, identity
from services.common.config import ConfigError
from services.common.errors import Unauthenticated
from services.common.identity import Principal, Role, ServiceTokenSigner

KEY = b"k" * 32
AUD = "clustering"   # the component the tokens below are minted for and verified by
ALICE = Principal("alice", Role.ANALYST)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def signer():
    clock = Clock()
    s = ServiceTokenSigner(KEY, ttl_s=300, clock=clock)
    s.clock = clock
    previous = identity._signer
    identity.configure_service_tokens(s)
    yield s
    identity.configure_service_tokens(previous)


def reason_of(exc_info) -> str:
    return getattr(exc_info.value, "reason", "")


def test_signed_token_verifies_for_the_same_principal_and_role(signer):
    token = signer.sign(ALICE, audience=AUD)
    signer.verify("alice", "analyst", token, audience=AUD)  # no exception


@pytest.mark.parametrize("pid,role", [("alice", "admin"), ("bob", "analyst"), ("alice ", "analyst")])
def test_token_does_not_transfer_to_another_principal_or_role(signer, pid, role):
    token = signer.sign(ALICE, audience=AUD)
    with pytest.raises(Unauthenticated) as info:
        signer.verify(pid, role, token, audience=AUD)
    assert reason_of(info) == "bad_token_signature"
    assert info.value.field == identity.TOKEN_KEY


def test_token_from_another_key_is_refused(signer):
    other = ServiceTokenSigner(b"x" * 32, clock=signer.clock)
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", other.sign(ALICE, audience=AUD), audience=AUD)
    assert reason_of(info) == "bad_token_signature"


def test_a_token_minted_for_one_service_is_refused_by_another(signer):
    # Captured on its way to clustering, it must not open privacy (Erase's neighbours).
    token = signer.sign(ALICE, audience="clustering")
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", token, audience="privacy")
    assert reason_of(info) == "wrong_audience"
    assert info.value.field == identity.TOKEN_KEY
    signer.verify("alice", "analyst", token, audience="clustering")   # still good where it was sent


def test_a_verified_token_stays_bound_to_its_audience(signer):
    token = signer.sign(ALICE, audience="clustering")
    signer.verify("alice", "analyst", token, audience="clustering")   # now in the verified cache
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", token, audience="privacy")
    assert reason_of(info) == "wrong_audience"


def test_rewriting_the_audience_of_a_token_breaks_its_signature(signer):
    token = signer.sign(ALICE, audience="clustering")
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", token.replace(".clustering.", ".privacy."), audience="privacy")
    assert reason_of(info) == "bad_token_signature"


def test_tokens_are_cached_per_audience(signer):
    to_clustering = signer.sign(ALICE, audience="clustering")
    to_privacy = signer.sign(ALICE, audience="privacy")
    assert to_clustering != to_privacy
    assert signer.sign(ALICE, audience="clustering") == to_clustering
    assert signer.sign(ALICE, audience="privacy") == to_privacy


@pytest.mark.parametrize("audience", ["", "Privacy", "a.b", "x" * 40, None])
def test_a_token_needs_a_component_name_as_audience(signer, audience):
    with pytest.raises(ValueError, match="audience"):
        signer.sign(ALICE, audience=audience)


def test_a_wrong_audience_is_reported_like_every_refusal(signer):
    seen = _refused_and_counted(ALICE.metadata("clustering"), "privacy", "wrong_audience")
    assert [(e.kind, e.component, e.reason, e.principal_id) for e in seen] == [
        ("authentication_failed", "privacy", "wrong_audience", "alice")]


def test_expiry_is_enforced_with_bounded_skew(signer):
    token = signer.sign(ALICE, audience=AUD)
    signer.clock.now += 300 + identity.CLOCK_SKEW_S - 1
    signer.verify("alice", "analyst", token, audience=AUD)
    signer.clock.now += 2
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", token, audience=AUD)
    assert reason_of(info) == "expired_token"


def test_a_token_valid_far_into_the_future_is_refused(signer):
    # Only a key holder could mint it, but a long-lived token is a mistake or an attack.
    token = signer.sign(ALICE, exp=int(signer.clock.now + 86400 * 365), audience=AUD)
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", token, audience=AUD)
    assert reason_of(info) == "token_lifetime_too_long"


@pytest.mark.parametrize("token", ["", "v2", "v2.clustering.abc.def", "v3.clustering.1800000100.AAAA",
                                   "v2.1800000100.AAAA", "v1.1800000100.AAAA", "v2.clustering.1800000100",
                                   "v2.clustering.1800000100.x.y", "v2.Clustering.1800000100.AAAA",
                                   "v2..1800000100.AAAA", "v2.clustering." + "9" * 40 + ".AAAA",
                                   "v2.c.1.A" * 100])
def test_malformed_tokens_are_refused(signer, token):
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", token, audience=AUD)
    assert reason_of(info) == "malformed_token"


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0, max_value=200), replacement=st.characters(
    codec="ascii", exclude_characters="\x00"))
def test_any_single_character_change_breaks_the_token(position, replacement):
    s = ServiceTokenSigner(KEY, clock=Clock())
    token = s.sign(ALICE, audience=AUD)
    i = position % len(token)
    if token[i] == replacement:
        return
    forged = token[:i] + replacement + token[i + 1:]
    # base64url without padding: the last character carries 2 unused bits, so a change
    # there can decode to the same MAC only if the string is identical; compare_digest on
    # the text refuses any other string.
    with pytest.raises(Unauthenticated):
        s.verify("alice", "analyst", forged, audience=AUD)


def test_tokens_are_cached_until_half_their_lifetime(signer):
    first = signer.sign(ALICE, audience=AUD)
    signer.clock.now += 100
    assert signer.sign(ALICE, audience=AUD) == first
    signer.clock.now += 60  # 160 s > ttl/2
    assert signer.sign(ALICE, audience=AUD) != first


def test_a_token_cached_while_the_clock_was_ahead_is_not_presented_after_it_steps_back(signer):
    """clock24: a signer whose clock stepped an hour ahead, then back, kept presenting the
    token it minted while ahead (it had "more than half its lifetime left") and every peer
    refused it (token_lifetime_too_long) for that hour."""
    real = signer.clock.now
    signer.clock.now = real + 3600
    ahead = signer.sign(ALICE, audience=AUD)
    signer.clock.now = real
    token = signer.sign(ALICE, audience=AUD)
    assert token != ahead
    assert signer.verify("alice", "analyst", token, audience=AUD) is None
    assert signer.sign(ALICE, audience=AUD) == token     # cached again from now on


def test_key_and_ttl_are_validated():
    with pytest.raises(ValueError, match="key"):
        ServiceTokenSigner(b"short")
    with pytest.raises(ValueError, match="ttl_s"):
        ServiceTokenSigner(KEY, ttl_s=0)


def signer_from_env(env: dict[str, str]) -> ServiceTokenSigner:
    """What a process builds at start from these variables (config.configure_process)."""
    return identity.signer_from_settings(config.settings_from(
        {"HEARTH_SERVICE_TOKEN_KEY": "", **env}))


def test_environment_key_must_be_long_enough():
    with pytest.raises(ConfigError, match="HEARTH_SERVICE_TOKEN_KEY"):
        signer_from_env({"HEARTH_SERVICE_TOKEN_KEY": "too-short"})
    with pytest.raises(ConfigError, match="HEARTH_SERVICE_TOKEN_TTL_S"):
        signer_from_env({"HEARTH_SERVICE_TOKEN_KEY": "k" * 40, "HEARTH_SERVICE_TOKEN_TTL_S": "-1"})
    assert signer_from_env({"HEARTH_SERVICE_TOKEN_KEY": "k" * 40, "HEARTH_SERVICE_TOKEN_TTL_S": "60"}).ttl_s == 60


def test_without_a_configured_key_two_processes_do_not_trust_each_other():
    a, b = signer_from_env({}), signer_from_env({})
    with pytest.raises(Unauthenticated):
        b.verify("alice", "analyst", a.sign(ALICE, audience=AUD), audience=AUD)
    a.verify("alice", "analyst", a.sign(ALICE, audience=AUD), audience=AUD)


def test_same_configured_key_in_two_processes_interoperates():
    env = {"HEARTH_SERVICE_TOKEN_KEY": "m" * 40}
    a, b = signer_from_env(env), signer_from_env(env)
    b.verify("alice", "analyst", a.sign(ALICE, audience=AUD), audience=AUD)


# --- principal_from_metadata: what the server interceptor does -----------------------

def test_metadata_round_trip(signer):
    assert identity.principal_from_metadata(ALICE.metadata(AUD), component=AUD) == ALICE


@pytest.mark.parametrize("metadata,field,reason", [
    ([], identity.PRINCIPAL_KEY, "missing_principal"),
    ([(identity.PRINCIPAL_KEY, "alice")], identity.PRINCIPAL_KEY, "missing_principal"),
    ([(identity.PRINCIPAL_KEY, "al ice"), (identity.ROLE_KEY, "analyst")], identity.PRINCIPAL_KEY,
     "malformed_principal"),
    ([(identity.PRINCIPAL_KEY, "alice"), (identity.ROLE_KEY, "root")], identity.ROLE_KEY, "unknown_role"),
    ([(identity.PRINCIPAL_KEY, "alice"), (identity.ROLE_KEY, "analyst")], identity.TOKEN_KEY, "missing_token"),
])
def test_incomplete_metadata_is_unauthenticated(signer, metadata, field, reason):
    with pytest.raises(Unauthenticated) as info:
        identity.principal_from_metadata(metadata, component=AUD)
    assert info.value.field == field
    assert reason_of(info) == reason


def test_escalating_the_role_next_to_a_valid_token_is_refused(signer):
    metadata = [(k, "admin" if k == identity.ROLE_KEY else v) for k, v in ALICE.metadata(AUD)]
    with pytest.raises(Unauthenticated) as info:
        identity.principal_from_metadata(metadata, component=AUD)
    assert reason_of(info) == "bad_token_signature"


UNSIGNED_ALICE = [(identity.PRINCIPAL_KEY, "alice"), (identity.ROLE_KEY, "analyst")]


def test_a_verified_tls_peer_still_needs_a_token_when_keys_are_configured(signer):
    """Until session 20 a verified certificate replaced the token: any pod of the mesh
    forwarded any principal."""
    with pytest.raises(Unauthenticated) as info:
        identity.principal_from_metadata(UNSIGNED_ALICE, component=AUD, peer_component="gateway")
    assert reason_of(info) == "missing_token"
    assert identity.principal_from_metadata(ALICE.metadata(AUD), component=AUD, peer_component="gateway") == ALICE


def test_with_the_shared_secret_the_certificate_must_be_one_that_may_vouch(signer):
    for peer in ("clustering", "feedback"):   # a data holder's certificate forwarding a person
        with pytest.raises(Unauthenticated) as info:
            identity.principal_from_metadata(ALICE.metadata(AUD), component=AUD, peer_component=peer)
        assert reason_of(info) == "certificate_may_not_vouch"
    privacy = identity.service_principal("privacy")
    with pytest.raises(Unauthenticated) as info:
        identity.principal_from_metadata(privacy.metadata(AUD), component=AUD, peer_component="clustering")
    assert reason_of(info) == "certificate_may_not_vouch"
    assert identity.principal_from_metadata(privacy.metadata(AUD), component=AUD, peer_component="privacy") == privacy


def test_a_certificate_naming_no_component_is_refused(signer):
    with pytest.raises(Unauthenticated) as info:
        identity.principal_from_metadata(ALICE.metadata(AUD), component=AUD, peer_component="")
    assert reason_of(info) == "unidentified_peer_certificate"


@pytest.fixture
def component_keys(tmp_path):
    from services.common import service_keys

    keys = service_keys.generate(tmp_path)
    keyset = service_keys.load_keyset(keys["keyset"])
    signers = {c: service_keys.ComponentTokenSigner(service_keys.load_private_key(keys[c]), keyset, 300.0)
               for c in service_keys.COMPONENTS}
    previous = identity._signer
    identity.configure_service_tokens(signers["attribution"])   # this process: attribution
    yield signers
    identity.configure_service_tokens(previous)


def _signed(signer, principal: Principal, audience: str) -> list[tuple[str, str]]:
    return [(identity.PRINCIPAL_KEY, principal.id), (identity.ROLE_KEY, principal.role.value),
            (identity.TOKEN_KEY, signer.sign(principal, audience=audience))]


def test_with_component_keys_the_certificate_must_name_the_tokens_signer(component_keys):
    privacy = identity.service_principal("privacy")
    captured = _signed(component_keys["privacy"], privacy, "attribution")   # a valid svc:privacy token
    assert identity.principal_from_metadata(captured, component="attribution", peer_component="privacy") == privacy
    for peer in ("clustering", "gateway", "feedback"):
        with pytest.raises(Unauthenticated) as info:
            identity.principal_from_metadata(captured, component="attribution", peer_component=peer)
        assert reason_of(info) == "certificate_not_signer"
    admin = Principal("alice", Role.ADMIN)
    forwarded = _signed(component_keys["gateway"], admin, "attribution")
    assert identity.principal_from_metadata(forwarded, component="attribution", peer_component="gateway") == admin
    with pytest.raises(Unauthenticated) as info:
        identity.principal_from_metadata(forwarded, component="attribution", peer_component="clustering")
    assert reason_of(info) == "certificate_not_signer"
    with pytest.raises(Unauthenticated) as info:   # the certificate alone: not with keys configured
        identity.principal_from_metadata(captured[:2], component="attribution", peer_component="privacy")
    assert reason_of(info) == "missing_token"


def test_without_keys_a_certificate_lets_its_component_act_only_as_itself():
    from services.common.service_keys import ComponentTokenSigner

    previous = identity._signer
    identity.configure_service_tokens(ComponentTokenSigner.ephemeral(300.0))
    try:
        clustering = identity.service_principal("clustering")
        unsigned = [(identity.PRINCIPAL_KEY, "svc:clustering"), (identity.ROLE_KEY, "service")]
        assert identity.principal_from_metadata(unsigned, component="privacy", peer_component="clustering") == clustering
        # another process's random key signed the token it sends along: ignored for its own principal
        other = ComponentTokenSigner.ephemeral(300.0)
        assert identity.principal_from_metadata(_signed(other, clustering, "privacy"), component="privacy",
                                                peer_component="clustering") == clustering
        for metadata, peer in ((unsigned, "gateway"), (unsigned, None),
                               ([(identity.PRINCIPAL_KEY, "svc:privacy"), (identity.ROLE_KEY, "service")], "clustering"),
                               ([(identity.PRINCIPAL_KEY, "svc:clustering"), (identity.ROLE_KEY, "admin")], "clustering"),
                               (UNSIGNED_ALICE, "gateway"),
                               (_signed(other, ALICE, "privacy"), "gateway")):
            with pytest.raises(Unauthenticated) as info:
                identity.principal_from_metadata(metadata, component="privacy", peer_component=peer)
            assert reason_of(info) in ("missing_token", "unknown_signing_key"), (metadata, peer)
    finally:
        identity.configure_service_tokens(previous)


def test_the_component_a_certificate_names():
    from services.common.tls import component_of_names

    assert component_of_names("clustering", ["localhost", "clustering", "hearth-clustering"]) == "clustering"
    assert component_of_names("", ["hearth-privacy"]) == "privacy"
    assert component_of_names("hearth-gateway", []) == "gateway"
    assert component_of_names("mesh", ["localhost", "clustering"]) == ""          # no hearth-<c>
    assert component_of_names("", ["hearth-privacy", "hearth-gateway"]) == ""     # two: nobody
    assert component_of_names("privacy", ["hearth-gateway"]) == ""
    assert component_of_names("", ["hearth-intruder"]) == ""


def _counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _refused_and_counted(metadata, component: str, reason: str) -> list[identity.SecurityEvent]:
    """``metadata`` refused at ``component``: UNAUTHENTICATED, counted once under ``reason``;
    returns what the security listeners saw."""
    seen: list[identity.SecurityEvent] = []
    remove = identity.add_security_listener(seen.append)
    before = _counter("hearth_auth_failures_total", component=component, reason=reason)
    try:
        with pytest.raises(Unauthenticated):
            identity.principal_from_metadata(metadata, component=component)
    finally:
        remove()
    assert _counter("hearth_auth_failures_total", component=component, reason=reason) == before + 1
    return seen


def test_refusals_are_counted_and_reach_listeners(signer):
    seen = _refused_and_counted([(identity.PRINCIPAL_KEY, "mallory"), (identity.ROLE_KEY, "admin")],
                                "clustering", "missing_token")
    assert [(e.kind, e.component, e.reason, e.principal_id, e.role) for e in seen] == [
        ("authentication_failed", "clustering", "missing_token", "mallory", "admin")]


def test_a_failing_listener_does_not_change_the_outcome(signer):
    def broken(_event):
        raise RuntimeError("listener bug")

    remove = identity.add_security_listener(broken)
    try:
        with pytest.raises(Unauthenticated):
            identity.principal_from_metadata([], component=AUD)
    finally:
        remove()


def test_acting_as_switches_the_outbound_principal_inside_the_block_only():
    svc = identity.service_principal("privacy")
    token = identity.set_current(ALICE)
    try:
        with identity.acting_as(svc):
            assert identity.current_principal() == svc
        assert identity.current_principal() == ALICE
    finally:
        identity.reset_current(token)


# --- the verified-token cache (issue #11: one HMAC per token, not per call) -------------

def test_a_token_verified_once_is_not_re_hashed_on_the_next_calls(signer, monkeypatch):
    token = signer.sign(ALICE, audience=AUD)
    signer.verify("alice", "analyst", token, audience=AUD)
    macs = []
    real_mac = signer._mac
    monkeypatch.setattr(signer, "_mac", lambda *a: macs.append(a) or real_mac(*a))
    for _ in range(3):
        signer.verify("alice", "analyst", token, audience=AUD)
    assert macs == []


@pytest.mark.parametrize("pid,role", [("alice", "admin"), ("bob", "analyst"), ("alice ", "analyst")])
def test_a_verified_token_stays_bound_to_its_principal_and_role(signer, pid, role):
    token = signer.sign(ALICE, audience=AUD)
    signer.verify("alice", "analyst", token, audience=AUD)   # now cached
    with pytest.raises(Unauthenticated) as info:
        signer.verify(pid, role, token, audience=AUD)
    assert reason_of(info) == "bad_token_signature"
    signer.verify("alice", "analyst", token, audience=AUD)   # the refusal did not evict or poison it


def test_a_cached_token_still_expires(signer):
    token = signer.sign(ALICE, audience=AUD)
    signer.verify("alice", "analyst", token, audience=AUD)
    signer.clock.now += 300 + identity.CLOCK_SKEW_S + 1
    with pytest.raises(Unauthenticated) as info:
        signer.verify("alice", "analyst", token, audience=AUD)
    assert reason_of(info) == "expired_token"


def test_a_forgery_of_a_verified_token_is_refused():
    s = ServiceTokenSigner(KEY, clock=Clock())
    token = s.sign(ALICE, audience=AUD)
    s.verify("alice", "analyst", token, audience=AUD)
    for i in range(len(token)):
        replacement = "A" if token[i] != "A" else "B"
        with pytest.raises(Unauthenticated):
            s.verify("alice", "analyst", token[:i] + replacement + token[i + 1:], audience=AUD)
    with pytest.raises(Unauthenticated):
        ServiceTokenSigner(b"y" * 32, clock=Clock()).verify("alice", "analyst", token, audience=AUD)


class _Context:
    def __init__(self, key: str | None, identities: list[bytes]) -> None:
        self._key, self._identities = key, identities

    def peer_identities(self):
        return self._identities or None

    def peer_identity_key(self):
        return self._key


def test_the_component_of_a_peer_is_read_from_what_grpc_verified():
    from services.common.tls import peer_component

    assert peer_component(_Context(None, [])) is None                       # plaintext
    sans = [b"localhost", b"clustering", b"hearth-clustering", b"127.0.0.1"]
    assert peer_component(_Context("x509_subject_alternative_name", sans)) == "clustering"
    assert peer_component(_Context("x509_subject_alternative_name", sans)) == "clustering"   # cached
    assert peer_component(_Context("x509_common_name", [b"privacy"])) == "privacy"          # no SANs
    # a certificate with SANs naming no component is not rescued by its common name
    assert peer_component(_Context("x509_subject_alternative_name", [b"localhost", b"privacy"])) == ""
    assert peer_component(_Context("x509_subject_alternative_name", [b"hearth-privacy", b"hearth-gateway"])) == ""
