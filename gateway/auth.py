"""Who is calling: the one module that turns an HTTP request into a Principal.

Two schemes, exactly one per request (both at once is refused):

* ``X-API-Key: <key>``. Keys are random (``hk_`` + 192 bits), so an unsalted SHA-256 is
  enough to store them: there is nothing to brute-force. The keys file
  (``HEARTH_API_KEYS_FILE``) holds only hashes::

      {"keys": [{"id": "k_1a2b3c", "sha256": "<hex>", "principal": "alice",
                 "role": "analyst", "created_at": "...", "expires_at": null}],
       "revoked": ["k_0f0f0f"]}

  A plain list of records (the format ``services.testing.mesh.write_api_key`` writes) is also
  read; a record without ``id`` gets ``sha256:<first 12 hex>``. Rotation: a principal may
  hold several keys; add the new one, move clients, revoke the old one. Revocation:
  put the id in ``revoked`` (or ``"revoked": true`` on the record). The gateway checks the
  file's mtime at most every ``HEARTH_API_KEYS_RELOAD_S`` (default 1 s; at once when a
  key is not found, so a new key works from its first request) and re-reads it when it
  changed, so a revocation holds within that interval. A file that becomes unreadable fails closed (no API key works) until
  it is fixed, because it *is* the revocation list. Write it atomically
  (``python -m gateway.auth add|revoke|list`` does).

* ``Authorization: Bearer <JWT>`` when ``HEARTH_JWT_ALGORITHM`` is set: the signature is
  checked with the one configured algorithm (``alg: none`` and HS/RS confusion are
  refused before PyJWT even sees the token), and ``iss``, ``aud``, ``exp`` (required),
  ``nbf`` (when present) and ``sub`` (the principal id) are checked; the role is the
  ``HEARTH_JWT_ROLE_CLAIM`` claim (default ``hearth_role``).

Every failure answers the same 401 body ("missing or invalid credentials"); the precise
reason goes only to logs, the ``hearth_auth_failures_total`` counter and the security
listeners (``services.common.identity.report_security_event``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.common.errors import Unauthenticated
from services.common.identity import (Principal, Role, SecurityEvent, report_security_event,
                                      reserved_principal_id, valid_principal_id)

log = logging.getLogger("hearth.gateway.auth")

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
MAX_API_KEY_CHARS = 256
MAX_JWT_CHARS = 8192
# The gateway cannot revoke a JWT (it checks no revocation list), so a token's lifetime is
# how long a leaked token or a de-provisioned user keeps working: a token that expires
# more than a day ahead is refused, whatever its issuer says (common issuers mint 5-60 min).
MAX_JWT_LIFETIME_S = 24 * 3600
_JWT_TIME_CLAIMS = ("exp", "nbf", "iat")
PUBLIC_MESSAGE = "missing or invalid credentials"


class AuthenticationFailed(Unauthenticated):
    """401 with the public message; ``reason`` is for logs and metrics only."""

    def __init__(self, reason: str, field: str) -> None:
        super().__init__(PUBLIC_MESSAGE, field)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApiKeyRecord:
    sha256: str
    principal: Principal
    id: str = ""
    revoked: bool = False
    expires_at: datetime | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _parse_time(value, where: str) -> datetime | None:
    if value in (None, ""):
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{where}: expires_at needs a UTC offset")
    return parsed


def parse_api_keys(raw) -> list[ApiKeyRecord]:
    """Records from the decoded keys file (either format). Raises ValueError naming the
    offending record."""
    if isinstance(raw, list):
        items, revoked_ids = raw, set()
    elif isinstance(raw, dict) and isinstance(raw.get("keys", []), list):
        items, revoked_ids = raw.get("keys", []), set(raw.get("revoked", []) or [])
    else:
        raise ValueError("keys file: expected a list of records or {\"keys\": [...], \"revoked\": [...]}")
    records = []
    for index, item in enumerate(items):
        where = f"keys[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: not an object")
        digest = str(item.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}.sha256: not a SHA-256 hex digest")
        principal_id = str(item.get("principal", ""))
        if not valid_principal_id(principal_id):
            raise ValueError(f"{where}.principal: invalid principal id")
        if reserved_principal_id(principal_id):
            raise ValueError(f"{where}.principal: 'svc:' names are reserved for the mesh's services")
        try:
            role = Role(item.get("role"))
        except ValueError:
            raise ValueError(f"{where}.role: one of {[r.value for r in Role]}") from None
        key_id = str(item.get("id") or f"sha256:{digest[:12]}")
        records.append(ApiKeyRecord(digest, Principal(principal_id, role), key_id,
                                    bool(item.get("revoked", False)) or key_id in revoked_ids,
                                    _parse_time(item.get("expires_at"), where)))
    return records


def load_api_keys(path: Path | None) -> list[ApiKeyRecord]:
    """Read the keys file at start-up; exit naming the variable when it is unusable."""
    if path is None:
        return []
    try:
        return parse_api_keys(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise SystemExit(f"HEARTH_API_KEYS_FILE: cannot read API keys from {path}: {exc}") from None


class ApiKeyStore:
    """Hash -> record, re-read when the file changes. The file is statted at most every
    ``reload_interval_s`` for keys it knows (0 = on every call) and at once for a key
    it does not know; a stat per request cost a system call on the hot path for a file
    that changes a few times a year."""

    def __init__(self, path: Path | None = None, records: list[ApiKeyRecord] | None = None,
                 reload_interval_s: float = 0.0) -> None:
        self._reload_interval = reload_interval_s
        self._next_check = 0.0
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._by_hash: dict[str, ApiKeyRecord] = {}
        if records is not None:
            self._index(records)
        elif self._path is not None:
            self._index(load_api_keys(self._path))
            self._signature = self._stat()

    def _index(self, records: list[ApiKeyRecord]) -> None:
        self._by_hash = {r.sha256: r for r in records}

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)

    def _refresh(self, force: bool = False) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + self._reload_interval
        signature = self._stat()
        if signature == self._signature:
            return
        with self._lock:
            if signature == self._signature:
                return
            try:
                records = parse_api_keys(json.loads(self._path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                # Fail closed: this file is the revocation list.
                log.error("API keys file unreadable, refusing every API key until fixed: %s", exc)
                records = []
            self._index(records)
            self._signature = signature

    def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record whose hash matches ``key``. A dict look-up on the SHA-256 of the
        key: timing reveals at most whether some key hashes to a prefix-equal digest,
        which does not help find a key."""
        self._refresh()
        digest = hash_key(key)
        record = self._by_hash.get(digest)
        if record is None and self._reload_interval > 0:
            self._refresh(force=True)   # maybe a key added since the last check
            record = self._by_hash.get(digest)
        if record is not None and hmac.compare_digest(record.sha256, digest):
            return record
        return None


# ---------------------------------------------------------------------------------------
# JWT
# ---------------------------------------------------------------------------------------

_JWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "jwt_expired"),
    (jwt.ImmatureSignatureError, "jwt_not_yet_valid"),
    (jwt.InvalidAudienceError, "jwt_wrong_audience"),
    (jwt.InvalidIssuerError, "jwt_wrong_issuer"),
    (jwt.MissingRequiredClaimError, "jwt_missing_claim"),
    (jwt.InvalidAlgorithmError, "jwt_wrong_algorithm"),
    (jwt.InvalidSignatureError, "jwt_bad_signature"),
    (jwt.InvalidKeyError, "jwt_bad_key"),
    (jwt.DecodeError, "jwt_malformed"),
)


class JwtVerifier:
    """Verifies bearer tokens with ONE algorithm fixed by configuration."""

    def __init__(self, algorithm: str, key, issuer: str, audience: str,
                 role_claim: str = "hearth_role", leeway_s: float = 30.0) -> None:
        if algorithm not in ("RS256", "ES256", "HS256"):
            raise ValueError("algorithm: RS256, ES256 or HS256")
        if algorithm == "RS256" and not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("key: RS256 needs an RSA public key")
        if algorithm == "ES256" and not (isinstance(key, ec.EllipticCurvePublicKey)
                                         and isinstance(key.curve, ec.SECP256R1)):
            raise ValueError("key: ES256 needs a P-256 public key")
        if algorithm == "HS256" and not (isinstance(key, (bytes, str)) and len(key) >= 32):
            raise ValueError("key: HS256 needs a secret of at least 32 characters")
        if not issuer or not audience:
            raise ValueError("issuer/audience: both are required")
        self.algorithm = algorithm
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._role_claim = role_claim
        self._leeway = leeway_s

    @classmethod
    def from_settings(cls, settings) -> "JwtVerifier | None":
        if settings.jwt_algorithm is None:
            return None
        if settings.jwt_algorithm == "HS256":
            key = settings.jwt_hs256_secret.get_secret_value()
        else:
            try:
                key = load_pem_public_key(Path(settings.jwt_public_key_file).read_bytes())
            except (OSError, ValueError) as exc:
                raise SystemExit(f"HEARTH_JWT_PUBLIC_KEY_FILE: cannot load a PEM public key: {exc}") from None
        try:
            return cls(settings.jwt_algorithm, key, settings.jwt_issuer, settings.jwt_audience,
                       settings.jwt_role_claim, settings.jwt_leeway_s)
        except ValueError as exc:
            raise SystemExit(f"HEARTH_JWT_PUBLIC_KEY_FILE: {exc}") from None

    def verify(self, token: str) -> Principal:
        field = AUTHORIZATION_HEADER
        if len(token) > MAX_JWT_CHARS or token.count(".") != 2:
            raise AuthenticationFailed("jwt_malformed", field)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("jwt_malformed", field) from None
        # Decided before any key is touched: "none", and any algorithm other than the
        # configured one (the HS256-signed-with-the-RSA-public-key trick) never verify.
        if header.get("alg") != self.algorithm:
            raise AuthenticationFailed("jwt_wrong_algorithm", field)
        if "crit" in header:  # no critical extensions are understood
            raise AuthenticationFailed("jwt_unsupported_header", field)
        try:
            claims = jwt.decode(
                token, self._key, algorithms=[self.algorithm], audience=self._audience,
                issuer=self._issuer, leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_signature": True,
                         "verify_exp": True, "verify_nbf": True, "verify_iat": True,
                         "verify_aud": True, "verify_iss": True})
        except jwt.PyJWTError as exc:
            reason = next((r for t, r in _JWT_REASONS if isinstance(exc, t)), "jwt_invalid")
            raise AuthenticationFailed(reason, field) from None
        # PyJWT reads these with int(), so "exp": "99999999999" passed as a number; a time
        # claim is a JSON number (RFC 7519 NumericDate) or the token is refused.
        if any(isinstance(claims.get(name), (str, bool)) for name in _JWT_TIME_CLAIMS):
            raise AuthenticationFailed("jwt_bad_time_claim", field)
        if claims["exp"] - time.time() > MAX_JWT_LIFETIME_S + self._leeway:
            raise AuthenticationFailed("jwt_lifetime_too_long", field)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not valid_principal_id(subject):
            raise AuthenticationFailed("jwt_bad_subject", field)
        if reserved_principal_id(subject):  # only the mesh's services act as svc:<name>
            raise AuthenticationFailed("jwt_reserved_subject", field)
        try:
            role = Role(claims.get(self._role_claim))
        except ValueError:
            raise AuthenticationFailed("jwt_unknown_role", field) from None
        return Principal(subject, role)


# ---------------------------------------------------------------------------------------
# the authenticator
# ---------------------------------------------------------------------------------------

class Authenticator:
    def __init__(self, keys: list[ApiKeyRecord] | ApiKeyStore, jwt_verifier: JwtVerifier | None = None,
                 clock=lambda: datetime.now(timezone.utc)) -> None:
        self._keys = keys if isinstance(keys, ApiKeyStore) else ApiKeyStore(records=keys)
        self._jwt = jwt_verifier
        self._clock = clock

    @classmethod
    def from_settings(cls, settings) -> "Authenticator":
        return cls(ApiKeyStore(settings.api_keys_file, reload_interval_s=settings.api_keys_reload_s),
                   JwtVerifier.from_settings(settings))

    def authenticate(self, headers, target: str = "") -> Principal:
        """The caller's principal, or AuthenticationFailed (-> 401) reported as a
        security event."""
        try:
            return self._authenticate(headers)
        except AuthenticationFailed as exc:
            report_security_event(SecurityEvent("authentication_failed", "gateway", exc.reason,
                                                target=target))
            raise

    def _authenticate(self, headers) -> Principal:
        api_key = headers.get(API_KEY_HEADER)
        authorization = headers.get(AUTHORIZATION_HEADER)
        getlist = getattr(headers, "getlist", None)   # Starlette's Headers keep every value
        if getlist is not None:
            # A credential header given twice: the gateway read the first, a proxy's rate
            # rule or log filter may read the last (session 21: a valid key then a bogus
            # one authenticated the valid one). Ambiguous, like two JSON keys.
            for name, value in ((API_KEY_HEADER, api_key), (AUTHORIZATION_HEADER, authorization)):
                if value is not None and len(getlist(name)) > 1:
                    raise AuthenticationFailed("ambiguous_credentials", name)
        if api_key is not None and authorization is not None:
            raise AuthenticationFailed("ambiguous_credentials", AUTHORIZATION_HEADER)
        if api_key is not None:
            return self._by_api_key(api_key)
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationFailed("unsupported_scheme", AUTHORIZATION_HEADER)
            if self._jwt is None:
                raise AuthenticationFailed("jwt_disabled", AUTHORIZATION_HEADER)
            return self._jwt.verify(token.strip())
        raise AuthenticationFailed("missing_credentials", API_KEY_HEADER)

    def _by_api_key(self, key: str) -> Principal:
        if not key or len(key) > MAX_API_KEY_CHARS:
            raise AuthenticationFailed("malformed_api_key", API_KEY_HEADER)
        record = self._keys.lookup(key)
        if record is None:
            raise AuthenticationFailed("unknown_api_key", API_KEY_HEADER)
        if record.revoked:
            raise AuthenticationFailed("revoked_api_key", API_KEY_HEADER)
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise AuthenticationFailed("expired_api_key", API_KEY_HEADER)
        return record.principal


# ---------------------------------------------------------------------------------------
# managing the keys file: python -m gateway.auth add|revoke|list --file PATH
# ---------------------------------------------------------------------------------------

def _read_document(path: Path) -> dict:
    if not path.exists():
        return {"keys": [], "revoked": []}
    raw = json.loads(path.read_text())
    if isinstance(raw, list):
        raw = {"keys": raw, "revoked": []}
    parse_api_keys(raw)  # validate before changing anything
    raw.setdefault("revoked", [])
    return raw


def _write_document(path: Path, document: dict) -> None:
    """Atomic replace, mode 0600: the gateway never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _expiry(expires_at: str | None) -> datetime | None:
    """``--expires-at`` parsed, or ValueError naming the option (not Python's "Invalid
    isoformat string", nor the file's ``keys[i]`` the key was not written to yet)."""
    if expires_at in (None, ""):
        return None
    try:
        return _parse_time(expires_at, "--expires-at")
    except ValueError:
        raise ValueError(f"--expires-at: {expires_at!r} is not an ISO-8601 time with a UTC offset "
                         "(e.g. 2027-01-01T00:00:00Z)") from None


def add_key(path: Path, principal: str, role: str, expires_at: str | None = None) -> tuple[str, str]:
    """Create a key for ``principal``; store only its hash. Returns (key id, key)."""
    if not valid_principal_id(principal):
        raise ValueError("principal: invalid principal id")
    if reserved_principal_id(principal):
        raise ValueError("principal: 'svc:' names are reserved for the mesh's services")
    Role(role)
    _expiry(expires_at)
    document = _read_document(Path(path))
    key = "hk_" + secrets.token_urlsafe(24)
    key_id = "k_" + secrets.token_hex(6)
    document["keys"].append({"id": key_id, "sha256": hash_key(key), "principal": principal, "role": role,
                             "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "expires_at": expires_at})
    parse_api_keys(document)
    _write_document(Path(path), document)
    return key_id, key


def revoke_key(path: Path, key_id: str) -> None:
    document = _read_document(Path(path))
    ids = {r.id for r in parse_api_keys(document)}
    if key_id not in ids:
        raise ValueError(f"key_id: no key {key_id!r} in {path}")
    if key_id not in document["revoked"]:
        document["revoked"].append(key_id)
    _write_document(Path(path), document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.auth", description="manage gateway API keys")
    parser.add_argument("--file", type=Path, required=True, help="the HEARTH_API_KEYS_FILE")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a key (printed once; only its hash is stored)")
    add.add_argument("principal")
    add.add_argument("role", choices=[r.value for r in Role])
    add.add_argument("--expires-at", help="ISO-8601 time with offset")
    revoke = sub.add_parser("revoke", help="revoke a key by id (effective within HEARTH_API_KEYS_RELOAD_S, 1 s by default)")
    revoke.add_argument("key_id")
    sub.add_parser("list", help="list key ids, principals, roles and state (never secrets)")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            # A key past its expiry is refused at its first use: adding one from the command
            # line only hands out a key that never works (add_key itself allows it: tests).
            when = _expiry(args.expires_at)
            if when is not None and when <= datetime.now(timezone.utc):
                raise ValueError(f"--expires-at: {args.expires_at!r} is in the past: the key would never work")
            key_id, key = add_key(args.file, args.principal, args.role, args.expires_at)
            print(json.dumps({"id": key_id, "key": key}))
        elif args.command == "revoke":
            revoke_key(args.file, args.key_id)
            print(json.dumps({"revoked": args.key_id}))
        else:
            for r in parse_api_keys(_read_document(args.file)):
                print(json.dumps({"id": r.id, "principal": r.principal.id, "role": r.principal.role.value,
                                  "revoked": r.revoked,
                                  "expires_at": r.expires_at.isoformat() if r.expires_at else None}))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
