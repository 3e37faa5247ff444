"""A signing key per component (services/common/service_keys.py): who may vouch for whom,
the keyset, rotation, and how a process picks its signer from its settings."""

from __future__ import annotations

import json
import stat

import pytest

from services.common import config, identity, service_keys
from services.common.config import ConfigError
from services.common.errors import Unauthenticated
from services.common.identity import Principal, Role
from services.common.service_keys import ComponentTokenSigner, may_vouch

ADMIN = Principal("alice", Role.ADMIN)
PRIVACY = identity.service_principal("privacy")


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return service_keys.generate(tmp_path_factory.mktemp("service-keys"))


def signer_of(keys, component: str, clock=None) -> ComponentTokenSigner:
    return ComponentTokenSigner(service_keys.load_private_key(keys[component]),
                                service_keys.load_keyset(keys["keyset"]), 300.0, clock or Clock())


def reason_of(info) -> str:
    return getattr(info.value, "reason", "")


@pytest.mark.parametrize("signer,principal,audience,allowed", [
    ("privacy", "svc:privacy", "clustering", True),
    ("gateway", "svc:privacy", "clustering", False),        # the compromised gateway
    ("clustering", "svc:privacy", "attribution", False),
    ("gateway", "svc:gateway", "privacy", True),            # its audit records
    ("gateway", "svc:clustering", "clustering", False),
    ("feedback", "SVC:privacy", "clustering", False),       # case games are still svc:
    ("gateway", "alice", "privacy", True),                  # the HTTP caller, forwarded
    ("gateway", "alice", "clustering", True),
    ("privacy", "alice", "clustering", True),               # an export job's ExportAccount
    ("privacy", "alice", "feedback", True),
    ("privacy", "alice", "privacy", False),
    ("clustering", "alice", "feedback", False),
    ("feedback", "alice", "clustering", False),
    ("attribution", "alice", "privacy", False),
])
def test_who_may_vouch_for_whom(signer, principal, audience, allowed):
    role = "service" if principal.lower().startswith("svc:") else "admin"
    assert may_vouch(signer, principal, audience, role) is allowed


@pytest.mark.parametrize("role", [r.value for r in Role if r != Role.SERVICE])
def test_a_component_cannot_raise_its_own_principals_role(keys, role):
    """svc:clustering signed by clustering's key as admin (or any role but service): a
    compromised data holder would export households and read the audit log at privacy."""
    assert may_vouch("clustering", "svc:clustering", "privacy", "service") is True
    assert may_vouch("clustering", "svc:clustering", "privacy", role) is False
    raised = Principal("svc:clustering", Role(role))
    token = signer_of(keys, "clustering").sign(raised, audience="privacy")
    verifier = signer_of(keys, "privacy")
    for _ in range(2):   # the second time from the verified-token cache: still refused
        with pytest.raises(Unauthenticated) as info:
            verifier.verify(raised.id, role, token, audience="privacy")
        assert reason_of(info) == "signer_may_not_vouch"


def test_a_component_signs_and_every_component_verifies(keys):
    token = signer_of(keys, "privacy").sign(PRIVACY, audience="clustering")
    assert token.startswith("v3.")
    signer_of(keys, "clustering").verify("svc:privacy", "service", token, audience="clustering")


def test_svc_privacy_signed_by_the_gateway_is_refused(keys):
    token = signer_of(keys, "gateway").sign(PRIVACY, audience="clustering")
    verifier = signer_of(keys, "clustering")
    for _ in range(2):   # the second time from the verified-token cache: still refused
        with pytest.raises(Unauthenticated) as info:
            verifier.verify("svc:privacy", "service", token, audience="clustering")
        assert reason_of(info) == "signer_may_not_vouch"


def test_a_persons_principal_needs_the_gateways_key(keys):
    verifier = signer_of(keys, "privacy")
    verifier.verify("alice", "admin", signer_of(keys, "gateway").sign(ADMIN, audience="privacy"), audience="privacy")
    with pytest.raises(Unauthenticated) as info:
        verifier.verify("alice", "admin", signer_of(keys, "clustering").sign(ADMIN, audience="privacy"),
                        audience="privacy")
    assert reason_of(info) == "signer_may_not_vouch"


def test_audience_signature_and_key_id_are_checked(keys):
    privacy, clustering = signer_of(keys, "privacy"), signer_of(keys, "clustering")
    token = privacy.sign(PRIVACY, audience="clustering")
    with pytest.raises(Unauthenticated) as info:
        signer_of(keys, "feedback").verify("svc:privacy", "service", token, audience="feedback")
    assert reason_of(info) == "wrong_audience"
    with pytest.raises(Unauthenticated) as info:
        clustering.verify("svc:privacy", "service", token.replace(".clustering.", ".feedback."), audience="feedback")
    assert reason_of(info) == "bad_token_signature"
    with pytest.raises(Unauthenticated) as info:
        clustering.verify("svc:clustering", "service", token, audience="clustering")
    assert reason_of(info) == "bad_token_signature"
    stranger = ComponentTokenSigner.ephemeral(300.0, Clock())
    with pytest.raises(Unauthenticated) as info:
        clustering.verify("svc:privacy", "service", stranger.sign(PRIVACY, audience="clustering"), audience="clustering")
    assert reason_of(info) == "unknown_signing_key"
    for bad in ("", "v3", token + ".x", token.replace("v3.", "v2."), "v3.XYZ" + token[6:], token[:-1] + "=="):
        with pytest.raises(Unauthenticated):
            clustering.verify("svc:privacy", "service", bad, audience="clustering")


def test_a_signature_forged_in_any_character_is_refused(keys):
    clustering = signer_of(keys, "clustering")
    token = signer_of(keys, "privacy").sign(PRIVACY, audience="clustering")
    clustering.verify("svc:privacy", "service", token, audience="clustering")   # now cached
    for i in range(len(token)):
        forged = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        with pytest.raises(Unauthenticated):
            clustering.verify("svc:privacy", "service", forged, audience="clustering")


def test_expiry_and_lifetime_are_enforced(keys):
    clock = Clock()
    privacy, clustering = signer_of(keys, "privacy", clock), signer_of(keys, "clustering", clock)
    token = privacy.sign(PRIVACY, audience="clustering")
    clock.now += 300 + identity.CLOCK_SKEW_S + 1
    with pytest.raises(Unauthenticated) as info:
        clustering.verify("svc:privacy", "service", token, audience="clustering")
    assert reason_of(info) == "expired_token"
    long_lived = privacy.sign(PRIVACY, exp=int(clock.now + 86400), audience="clustering")
    with pytest.raises(Unauthenticated) as info:
        clustering.verify("svc:privacy", "service", long_lived, audience="clustering")
    assert reason_of(info) == "token_lifetime_too_long"


def test_tokens_are_cached_per_principal_and_audience(keys):
    privacy = signer_of(keys, "privacy")
    first = privacy.sign(PRIVACY, audience="clustering")
    assert privacy.sign(PRIVACY, audience="clustering") == first
    assert privacy.sign(PRIVACY, audience="feedback") != first


def test_rotation_two_keys_of_one_component_both_verify(keys, tmp_path):
    """Rotating privacy's key: the keyset lists the old and the new key (each with its
    kid); tokens of either verify until the old one is removed."""
    new = service_keys.generate(tmp_path / "new", ("privacy",))
    keyset = json.loads(keys["keyset"].read_text())
    keyset["keys"] += json.loads(new["keyset"].read_text())["keys"]
    both = tmp_path / "both.json"
    both.write_text(json.dumps(keyset))
    verifier = ComponentTokenSigner(service_keys.load_private_key(keys["clustering"]),
                                    service_keys.load_keyset(both), 300.0, Clock())
    new_signer = ComponentTokenSigner(service_keys.load_private_key(new["privacy"]),
                                      service_keys.load_keyset(both), 300.0, Clock())
    assert new_signer.component == "privacy" and new_signer.kid != signer_of(keys, "privacy").kid
    for signer in (signer_of(keys, "privacy"), new_signer):
        verifier.verify("svc:privacy", "service", signer.sign(PRIVACY, audience="clustering"), audience="clustering")
    old_removed = signer_of(keys, "clustering")   # the original keyset: no new privacy key
    with pytest.raises(Unauthenticated) as info:
        old_removed.verify("svc:privacy", "service", new_signer.sign(PRIVACY, audience="clustering"),
                           audience="clustering")
    assert reason_of(info) == "unknown_signing_key"


@pytest.mark.parametrize("document,message", [
    ({"keys": []}, "non-empty"),
    ({"keys": [{"component": "root", "public_key": "AAAA"}]}, "unknown component"),
    ({}, "keys"),
    ("not json", "keyset"),
])
def test_a_bad_keyset_is_refused_naming_the_file(tmp_path, document, message):
    path = tmp_path / "keys.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(service_keys.KeyError_, match=message) as info:
        service_keys.load_keyset(path)
    assert str(path) in str(info.value)


def test_a_keyset_entry_naming_the_wrong_kid_is_refused(keys, tmp_path):
    document = json.loads(keys["keyset"].read_text())
    document["keys"][0]["kid"] = "0123456789abcdef"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    with pytest.raises(service_keys.KeyError_, match="kid"):
        service_keys.load_keyset(path)


def test_generate_keeps_existing_keys_and_writes_private_keys_0600(tmp_path):
    first = service_keys.generate(tmp_path)
    before = {c: first[c].read_bytes() for c in service_keys.COMPONENTS}
    again = service_keys.generate(tmp_path)
    assert {c: again[c].read_bytes() for c in service_keys.COMPONENTS} == before
    for component in service_keys.COMPONENTS:
        assert stat.S_IMODE(first[component].stat().st_mode) == 0o600
    assert "PRIVATE" not in first["keyset"].read_text()


def test_generating_one_components_key_keeps_every_key_the_keyset_listed(tmp_path):
    """`generate DIR privacy` on a folder holding all five keys, after an earlier privacy
    key was added to the keyset by hand (a rotation): every key stays listed."""
    every = service_keys.generate(tmp_path)
    earlier = json.loads(service_keys.generate(tmp_path / "earlier", ("privacy",))["keyset"].read_text())["keys"]
    listed = json.loads(every["keyset"].read_text())
    every["keyset"].write_text(json.dumps({"keys": listed["keys"] + earlier}))
    service_keys.main(["generate", str(tmp_path), "privacy"])
    kept = service_keys.load_keyset(every["keyset"])
    assert {key.component for key in kept.values()} == set(service_keys.COMPONENTS)
    assert set(kept) == {entry["kid"] for entry in listed["keys"] + earlier}


# --- a process's signer from its settings (config.configure_process) -------------------

def signer_from_env(env: dict[str, str], component: str | None = None):
    return identity.signer_from_settings(config.settings_from(
        {"HEARTH_SERVICE_TOKEN_KEY": "", "HEARTH_SERVICE_SIGNING_KEY_FILE": "",
         "HEARTH_SERVICE_PUBLIC_KEYS_FILE": "", **env}), component)


def test_settings_give_the_components_own_signer(keys):
    signer = signer_from_env({"HEARTH_SERVICE_SIGNING_KEY_FILE": str(keys["gateway"]),
                              "HEARTH_SERVICE_PUBLIC_KEYS_FILE": str(keys["keyset"])}, "gateway")
    assert isinstance(signer, ComponentTokenSigner) and signer.component == "gateway"


def test_a_process_refuses_to_start_with_another_components_key(keys):
    with pytest.raises(ConfigError, match="HEARTH_SERVICE_SIGNING_KEY_FILE.*privacy's, not gateway's"):
        signer_from_env({"HEARTH_SERVICE_SIGNING_KEY_FILE": str(keys["privacy"]),
                         "HEARTH_SERVICE_PUBLIC_KEYS_FILE": str(keys["keyset"])}, "gateway")


@pytest.mark.parametrize("env,named", [
    ({"HEARTH_SERVICE_SIGNING_KEY_FILE": "KEY"}, "HEARTH_SERVICE_PUBLIC_KEYS_FILE"),
    ({"HEARTH_SERVICE_PUBLIC_KEYS_FILE": "KEYSET"}, "HEARTH_SERVICE_SIGNING_KEY_FILE"),
    ({"HEARTH_SERVICE_SIGNING_KEY_FILE": "KEY", "HEARTH_SERVICE_PUBLIC_KEYS_FILE": "KEYSET",
      "HEARTH_SERVICE_TOKEN_KEY": "k" * 40}, "HEARTH_SERVICE_TOKEN_KEY"),
    ({"HEARTH_SERVICE_SIGNING_KEY_FILE": "/nonexistent.pem", "HEARTH_SERVICE_PUBLIC_KEYS_FILE": "KEYSET"},
     "HEARTH_SERVICE_SIGNING_KEY_FILE"),
    ({"HEARTH_SERVICE_SIGNING_KEY_FILE": "KEY", "HEARTH_SERVICE_PUBLIC_KEYS_FILE": "/nonexistent.json"},
     "HEARTH_SERVICE_PUBLIC_KEYS_FILE"),
])
def test_an_incomplete_or_unreadable_key_configuration_stops_the_process(keys, env, named):
    env = {k: {"KEY": str(keys["gateway"]), "KEYSET": str(keys["keyset"])}.get(v, v) for k, v in env.items()}
    with pytest.raises(ConfigError, match=named):
        signer_from_env(env)


def test_the_shared_mesh_secret_is_the_transitional_mode(caplog):
    signer = signer_from_env({"HEARTH_SERVICE_TOKEN_KEY": "m" * 40})
    assert isinstance(signer, identity.ServiceTokenSigner)
    assert "HEARTH_SERVICE_SIGNING_KEY_FILE" in caplog.text


def test_without_keys_a_process_trusts_only_its_own_random_key():
    a, b = signer_from_env({}), signer_from_env({})
    token = a.sign(PRIVACY, audience="clustering")
    a.verify("svc:privacy", "service", token, audience="clustering")
    with pytest.raises(Unauthenticated) as info:
        b.verify("svc:privacy", "service", token, audience="clustering")
    assert reason_of(info) == "unknown_signing_key"


def test_the_command_line_generates_a_keyset(tmp_path, capsys):
    assert service_keys.main(["generate", str(tmp_path), "privacy", "gateway"]) == 0
    keyset = service_keys.load_keyset(tmp_path / "public-keys.json")
    assert sorted(k.component for k in keyset.values()) == ["gateway", "privacy"]
    with pytest.raises(SystemExit):
        service_keys.main(["generate", str(tmp_path), "root"])


def test_a_component_token_cached_while_the_clock_was_ahead_is_not_presented_after_it_steps_back(keys):
    """clock24: as tests/unit/security/test_identity.py, for the per-component signer."""
    clock = Clock()
    real = clock.now
    signer, verifier = signer_of(keys, "gateway", clock), signer_of(keys, "clustering", Clock(real))
    principal = Principal("alice", Role.ANALYST)
    clock.now = real + 3600
    ahead = signer.sign(principal, audience="clustering")
    clock.now = real
    with pytest.raises(Unauthenticated) as refused:
        verifier.verify("alice", "analyst", ahead, audience="clustering")
    assert reason_of(refused) == "token_lifetime_too_long"
    token = signer.sign(principal, audience="clustering")
    assert token != ahead
    assert verifier.verify("alice", "analyst", token, audience="clustering") == "gateway"
