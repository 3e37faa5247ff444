"""Every way to present bad credentials to the real gateway gets the same 401, good ones
work, and a revoked key stops working within the keys-file reload interval (1 s)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import auth
from services.common.identity import Role

ROUTE = "/v1/household/sec-auth-nobody"
UNAUTHORIZED = {"error": {"code": "unauthenticated", "message": "missing or invalid credentials"}}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def get(security_mesh, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(security_mesh.url + ROUTE, headers=headers, timeout=10)


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    # Identical for every failure: nothing tells an attacker which check failed.
    assert {k: error[k] for k in ("code", "message")} == UNAUTHORIZED["error"]
    assert error["field"] in ("x-api-key", "authorization")


def _none_token(security_mesh) -> str:
    now = int(time.time())
    claims = {"iss": "https://idp.security-suite.test", "aud": "hearth-security-suite", "sub": "mallory",
              "hearth_role": "admin", "exp": now + 300}
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}."


def _hs_confusion_token(security_mesh) -> str:
    # HS256 "signed" with the server's RSA *public* key, which an attacker can know.
    pem = security_mesh.jwt_private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    claims = {"iss": "https://idp.security-suite.test", "aud": "hearth-security-suite", "sub": "mallory",
              "hearth_role": "admin", "exp": now + 300}
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


def _resigned_token(security_mesh) -> str:
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return security_mesh.jwt(Role.ADMIN, key=attacker)


def _tampered_token(security_mesh) -> str:
    header, _, signature = security_mesh.jwt(Role.ANALYST).split(".")
    now = int(time.time())
    escalated = {"iss": "https://idp.security-suite.test", "aud": "hearth-security-suite",
                 "sub": "sec-jwt-user", "hearth_role": "admin", "iat": now, "exp": now + 300}
    return f"{header}.{b64(json.dumps(escalated).encode())}.{signature}"


BAD_BEARERS = {
    "expired": lambda m: m.jwt(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
    "not_yet_valid": lambda m: m.jwt(nbf=int(time.time()) + 3600),
    "wrong_audience": lambda m: m.jwt(aud="another-api"),
    "wrong_issuer": lambda m: m.jwt(iss="https://evil.test"),
    "no_expiry": lambda m: m.jwt(exp=None),
    "alg_none": _none_token,
    "hs_rs_confusion": _hs_confusion_token,
    "resigned_by_another_key": _resigned_token,
    "payload_tampered": _tampered_token,
    "unknown_role": lambda m: m.jwt(hearth_role="root"),
    "garbage": lambda m: "not-a-jwt",
    "three_garbage_parts": lambda m: "a.b.c",
}


def test_missing_credentials(security_mesh):
    assert_401(get(security_mesh, {}))


@pytest.mark.parametrize("headers", [
    {"X-API-Key": "hk_wrong"},
    {"X-API-Key": ""},
    {"X-API-Key": "x" * 1000},
    {"Authorization": "Basic YWRtaW46YWRtaW4="},
    {"Authorization": "Bearer"},
    {"Authorization": "Token abc"},
], ids=["unknown-key", "empty-key", "huge-key", "basic", "bearer-without-token", "other-scheme"])
def test_malformed_credentials(security_mesh, headers):
    assert_401(get(security_mesh, headers))


@pytest.mark.parametrize("case", sorted(BAD_BEARERS))
def test_bad_bearer_tokens_are_refused(security_mesh, case):
    token = BAD_BEARERS[case](security_mesh)
    assert_401(get(security_mesh, {"Authorization": f"Bearer {token}"}))


def test_a_valid_bearer_token_authenticates_with_its_role(security_mesh):
    admin = get(security_mesh, {"Authorization": f"Bearer {security_mesh.jwt(Role.ADMIN)}"})
    assert admin.status_code == 404 and admin.json()["error"]["field"] == "account_id"  # authorised, no data
    analyst = get(security_mesh, {"Authorization": f"Bearer {security_mesh.jwt(Role.ANALYST)}"})
    assert analyst.status_code == 403
    assert analyst.json()["error"]["code"] == "permission_denied"


def test_key_and_bearer_together_are_refused(security_mesh):
    assert_401(get(security_mesh, {"X-API-Key": security_mesh.role_keys[Role.ADMIN],
                                   "Authorization": f"Bearer {security_mesh.jwt(Role.ADMIN)}"}))


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
def test_a_credential_header_given_twice_is_refused_not_read_as_the_first(security_mesh, header):
    """Until session 21 a valid admin key followed by a bogus one in a second X-API-Key
    header authenticated the admin (the gateway read the first value), while a proxy's
    rate rule or log filter reading the last saw the bogus one; a bogus one first was
    a 401. Ambiguous, like a JSON key given twice: 401 either way, audited and counted
    as ambiguous_credentials."""
    valid = (security_mesh.role_keys[Role.ADMIN] if header == "X-API-Key"
             else f"Bearer {security_mesh.jwt(Role.ADMIN)}")
    bogus = "hk_bogus" if header == "X-API-Key" else "Bearer x.y.z"
    for values in ((valid, bogus), (bogus, valid), (valid, valid)):
        response = httpx.get(security_mesh.url + ROUTE, headers=[(header, v) for v in values], timeout=10)
        assert_401(response)
    assert get(security_mesh, {header: valid}).status_code == 404   # one is served as ever


def wait_until_refused(mesh, key: str, within_s: float = 3.0) -> None:
    """The gateway re-checks the keys file at most every HEARTH_API_KEYS_RELOAD_S (1 s)."""
    deadline = time.monotonic() + within_s
    while get(mesh, {"X-API-Key": key}).status_code != 401 and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_revoked_key_stops_working_within_the_reload_interval(security_mesh):
    key_id, key = auth.add_key(security_mesh.keys_file, "sec-revoke-me", "admin")
    assert get(security_mesh, {"X-API-Key": key}).status_code == 404  # works (no such household)
    auth.revoke_key(security_mesh.keys_file, key_id)
    wait_until_refused(security_mesh, key)
    assert_401(get(security_mesh, {"X-API-Key": key}))
    # Other keys are unaffected.
    assert get(security_mesh, {"X-API-Key": security_mesh.role_keys[Role.ADMIN]}).status_code == 404


def test_rotation_both_keys_work_until_the_old_one_is_revoked(security_mesh):
    old_id, old = auth.add_key(security_mesh.keys_file, "sec-rotating", "data_scientist")
    _, new = auth.add_key(security_mesh.keys_file, "sec-rotating", "data_scientist")
    assert get(security_mesh, {"X-API-Key": old}).status_code == 404
    assert get(security_mesh, {"X-API-Key": new}).status_code == 404
    auth.revoke_key(security_mesh.keys_file, old_id)
    wait_until_refused(security_mesh, old)
    assert_401(get(security_mesh, {"X-API-Key": old}))
    assert get(security_mesh, {"X-API-Key": new}).status_code == 404


def _sample(metrics: str, prefix: str) -> float:
    line = next(l for l in metrics.splitlines() if l.startswith(prefix))
    return float(line.rsplit(" ", 1)[1])


def test_failures_and_denials_are_counted(security_mesh):
    get(security_mesh, {"Authorization": f"Bearer {BAD_BEARERS['expired'](security_mesh)}"})
    get(security_mesh, {"X-API-Key": security_mesh.role_keys[Role.ANALYST]})
    metrics = httpx.get(f"http://127.0.0.1:{security_mesh.mesh.gateway_metrics_port}/metrics", timeout=10).text
    assert _sample(metrics, 'hearth_auth_failures_total{component="gateway",reason="jwt_expired"}') >= 1
    assert _sample(metrics, 'hearth_access_denied_total{component="gateway",role="analyst",'
                            'target="GET /v1/household/{account_id}"}') >= 1


def test_keys_file_holds_no_secret(security_mesh):
    text = security_mesh.keys_file.read_text()
    for key in security_mesh.role_keys.values():
        assert key not in text
        assert auth.hash_key(key) in text
