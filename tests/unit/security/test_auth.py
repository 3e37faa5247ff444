"""Gateway authentication: API keys (hash-only, rotation, revocation on file change,
expiry) and JWT bearer tokens (every way a token can be wrong)."""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import datetime, timedelta, timezone

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import auth
from gateway.auth import ApiKeyStore, AuthenticationFailed, Authenticator, JwtVerifier
from services.common.identity import Principal, Role

ISS, AUD = "https://idp.test", "hearth-api"


def headers(**kv) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in kv.items()}


def fail_reason(authenticator: Authenticator, hdrs: dict) -> str:
    with pytest.raises(AuthenticationFailed) as info:
        authenticator.authenticate(hdrs)
    assert info.value.message == auth.PUBLIC_MESSAGE  # never says why
    return info.value.reason


# --- API keys -----------------------------------------------------------------------

def test_added_key_authenticates_and_only_its_hash_is_stored(tmp_path):
    path = tmp_path / "keys.json"
    key_id, key = auth.add_key(path, "alice", "analyst")
    text = path.read_text()
    assert key not in text and auth.hash_key(key) in text and key_id in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    a = Authenticator(ApiKeyStore(path))
    assert a.authenticate(headers(x_api_key=key)) == Principal("alice", Role.ANALYST)


def test_rotation_two_keys_for_one_principal_then_revoke_the_old(tmp_path):
    path = tmp_path / "keys.json"
    old_id, old = auth.add_key(path, "svc-ingest", "service")
    a = Authenticator(ApiKeyStore(path))
    new_id, new = auth.add_key(path, "svc-ingest", "service")
    assert new_id != old_id
    assert a.authenticate(headers(x_api_key=old)) == a.authenticate(headers(x_api_key=new))
    auth.revoke_key(path, old_id)
    assert fail_reason(a, headers(x_api_key=old)) == "revoked_api_key"  # at once, same store
    assert a.authenticate(headers(x_api_key=new)).id == "svc-ingest"


def test_revocation_by_flag_in_the_legacy_list_format(tmp_path):
    path = tmp_path / "keys.json"
    key = "hk_legacy-key-value"
    path.write_text(json.dumps([{"sha256": auth.hash_key(key), "principal": "bob", "role": "admin"}]))
    a = Authenticator(ApiKeyStore(path))
    assert a.authenticate(headers(x_api_key=key)).role is Role.ADMIN
    path.write_text(json.dumps([{"sha256": auth.hash_key(key), "principal": "bob", "role": "admin",
                                 "revoked": True}]))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert fail_reason(a, headers(x_api_key=key)) == "revoked_api_key"


def test_an_unreadable_keys_file_fails_closed(tmp_path):
    path = tmp_path / "keys.json"
    _, key = auth.add_key(path, "alice", "analyst")
    a = Authenticator(ApiKeyStore(path))
    a.authenticate(headers(x_api_key=key))
    path.write_text("{ not json")
    assert fail_reason(a, headers(x_api_key=key)) == "unknown_api_key"
    path.unlink()
    assert fail_reason(a, headers(x_api_key=key)) == "unknown_api_key"


def test_expired_key_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    _, key = auth.add_key(path, "temp", "analyst", expires_at=past)
    assert fail_reason(Authenticator(ApiKeyStore(path)), headers(x_api_key=key)) == "expired_api_key"


@pytest.mark.parametrize("hdrs,reason", [
    ({}, "missing_credentials"),
    ({"x-api-key": ""}, "malformed_api_key"),
    ({"x-api-key": "k" * 300}, "malformed_api_key"),
    ({"x-api-key": "hk_not-a-key"}, "unknown_api_key"),
    ({"authorization": "Basic dXNlcjpwYXNz"}, "unsupported_scheme"),
    ({"authorization": "Bearer "}, "unsupported_scheme"),
    ({"authorization": "Bearer a.b.c"}, "jwt_disabled"),
])
def test_bad_or_missing_credentials(tmp_path, hdrs, reason):
    path = tmp_path / "keys.json"
    auth.add_key(path, "alice", "analyst")
    assert fail_reason(Authenticator(ApiKeyStore(path)), hdrs) == reason


def test_two_credentials_at_once_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    _, key = auth.add_key(path, "alice", "analyst")
    a = Authenticator(ApiKeyStore(path))
    assert fail_reason(a, {"x-api-key": key, "authorization": "Bearer x.y.z"}) == "ambiguous_credentials"


@pytest.mark.parametrize("name", ["x-api-key", "authorization"])
def test_a_credential_header_given_twice_is_refused(tmp_path, name):
    """The gateway reads the first value, a proxy may read the last: ambiguous (session 21)."""
    from starlette.datastructures import Headers

    path = tmp_path / "keys.json"
    _, key = auth.add_key(path, "alice", "analyst")
    a = Authenticator(ApiKeyStore(path))
    first = key if name == "x-api-key" else "Bearer x.y.z"
    headers = Headers(raw=[(name.encode(), first.encode()), (name.encode(), b"hk_bogus")])
    assert fail_reason(a, headers) == "ambiguous_credentials"
    assert a.authenticate(Headers(raw=[(b"x-api-key", key.encode())])).id == "alice"


@pytest.mark.parametrize("document,field", [
    ([{"sha256": "zz", "principal": "a", "role": "admin"}], "keys[0].sha256"),
    ([{"sha256": "0" * 64, "principal": "a b", "role": "admin"}], "keys[0].principal"),
    ([{"sha256": "0" * 64, "principal": "a", "role": "root"}], "keys[0].role"),
    ({"keys": "nope"}, "keys file"),
])
def test_keys_file_errors_name_the_record(document, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        auth.parse_api_keys(document)


def test_cli_add_list_revoke(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert auth.main(["--file", str(path), "add", "carol", "privacy_officer"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert auth.main(["--file", str(path), "revoke", created["id"]]) == 0
    capsys.readouterr()
    assert auth.main(["--file", str(path), "list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed == [{"id": created["id"], "principal": "carol", "role": "privacy_officer",
                       "revoked": True, "expires_at": None}]
    assert created["key"] not in path.read_text()
    assert auth.main(["--file", str(path), "revoke", "k_nope"]) == 2


# --- JWT ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def verifier(rsa_key):
    return Authenticator([], JwtVerifier("RS256", rsa_key.public_key(), ISS, AUD))


def claims(**over):
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "dana", "hearth_role": "data_scientist",
            "iat": now, "exp": now + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_valid_rs256_token(verifier, rsa_key):
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert verifier.authenticate(bearer(token)) == Principal("dana", Role.DATA_SCIENTIST)


# Times built when the test runs, not at collection (as below): a suite that ran 74 minutes
# on a loaded machine reached this case after its "not before, an hour from now" had passed.
@pytest.mark.parametrize("over,reason", [
    (lambda now: {"exp": now - 3600}, "jwt_expired"),
    (lambda now: {"nbf": now + 3600}, "jwt_not_yet_valid"),
    (lambda now: {"aud": "someone-else"}, "jwt_wrong_audience"),
    (lambda now: {"iss": "https://evil.test"}, "jwt_wrong_issuer"),
    (lambda now: {"exp": None}, "jwt_missing_claim"),
    (lambda now: {"sub": None}, "jwt_missing_claim"),
    (lambda now: {"sub": "has space"}, "jwt_bad_subject"),
    (lambda now: {"hearth_role": "root"}, "jwt_unknown_role"),
    (lambda now: {"hearth_role": None}, "jwt_unknown_role"),
])
def test_invalid_claims_are_refused(verifier, rsa_key, over, reason):
    token = jwt.encode(claims(**over(int(time.time()))), rsa_key, algorithm="RS256")
    assert fail_reason(verifier, bearer(token)) == reason


# Built when the test runs, not at collection: the suite runs for minutes, and a token
# that expires 300 s after collection is merely expired by then (seen in CI).
@pytest.mark.parametrize("over,reason", [
    (lambda now: {"exp": str(now + 300)}, "jwt_bad_time_claim"),  # PyJWT's int() took it
    (lambda now: {"iat": str(now)}, "jwt_bad_time_claim"),
    (lambda now: {"exp": now + 2 * 24 * 3600}, "jwt_lifetime_too_long"),
    (lambda now: {"exp": 10**12}, "jwt_lifetime_too_long"),   # the year 33658: accepted until session 18
])
def test_time_claims_are_numbers_and_a_token_lives_at_most_a_day(verifier, rsa_key, over, reason):
    token = jwt.encode(claims(**over(int(time.time()))), rsa_key, algorithm="RS256")
    assert fail_reason(verifier, bearer(token)) == reason


def test_a_token_valid_for_just_under_a_day_is_accepted(verifier, rsa_key):
    token = jwt.encode(claims(exp=int(time.time()) + 24 * 3600 - 60), rsa_key, algorithm="RS256")
    assert verifier.authenticate(bearer(token)) == Principal("dana", Role.DATA_SCIENTIST)


def test_alg_none_is_refused(verifier):
    token = f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims()).encode())}."
    assert fail_reason(verifier, bearer(token)) == "jwt_wrong_algorithm"


def test_hs256_signed_with_the_rsa_public_key_is_refused(verifier, rsa_key):
    # The classic confusion: an attacker uses the (public) RSA key as an HMAC secret.
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(hearth_role="admin")).encode())
    import hashlib
    import hmac

    signature = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert fail_reason(verifier, bearer(f"{header}.{payload}.{signature}")) == "jwt_wrong_algorithm"


def test_resigned_or_tampered_tokens_are_refused(verifier, rsa_key):
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(hearth_role="admin"), attacker, algorithm="RS256")
    assert fail_reason(verifier, bearer(forged)) == "jwt_bad_signature"
    good = jwt.encode(claims(), rsa_key, algorithm="RS256")
    header, _, signature = good.split(".")
    escalated = b64(json.dumps(claims(hearth_role="admin")).encode())
    assert fail_reason(verifier, bearer(f"{header}.{escalated}.{signature}")) == "jwt_bad_signature"


@pytest.mark.parametrize("token", ["abc", "a.b", "a.b.c", "....", "x" * 9000])
def test_garbage_tokens_are_refused(verifier, token):
    assert fail_reason(verifier, bearer(token)) == "jwt_malformed"


def test_critical_header_extensions_are_refused(verifier, rsa_key):
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"crit": ["exp"]})
    # PyJWT itself rejects unknown critical extensions; either way the token is refused.
    assert fail_reason(verifier, bearer(token)) in ("jwt_unsupported_header", "jwt_malformed")


def test_es256_with_p256_key():
    key = ec.generate_private_key(ec.SECP256R1())
    a = Authenticator([], JwtVerifier("ES256", key.public_key(), ISS, AUD))
    assert a.authenticate(bearer(jwt.encode(claims(), key, algorithm="ES256"))).id == "dana"
    rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert fail_reason(a, bearer(jwt.encode(claims(), rs, algorithm="RS256"))) == "jwt_wrong_algorithm"


def test_hs256_only_when_configured_with_a_long_secret():
    secret = "s" * 40
    a = Authenticator([], JwtVerifier("HS256", secret, ISS, AUD))
    assert a.authenticate(bearer(jwt.encode(claims(), secret, algorithm="HS256"))).id == "dana"
    assert fail_reason(a, bearer(jwt.encode(claims(), "t" * 40, algorithm="HS256"))) == "jwt_bad_signature"
    with pytest.raises(ValueError, match="key"):
        JwtVerifier("HS256", "short", ISS, AUD)


def test_key_type_must_match_the_algorithm():
    rs = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ecpub = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ValueError, match="key"):
        JwtVerifier("RS256", ecpub, ISS, AUD)
    with pytest.raises(ValueError, match="key"):
        JwtVerifier("ES256", rs, ISS, AUD)
    with pytest.raises(ValueError, match="key"):
        JwtVerifier("ES256", ec.generate_private_key(ec.SECP384R1()).public_key(), ISS, AUD)
