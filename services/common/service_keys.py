"""Service tokens signed with a key per component (Ed25519): a compromised member of the
mesh — the internet-facing gateway above all — can no longer mint a token for another
component's principal (``svc:privacy``, the only one that may ``DataHolder/Erase``).

Each component (gateway, clustering, attribution, privacy, feedback) holds only its own
private key (``HEARTH_SERVICE_SIGNING_KEY_FILE``, PEM PKCS#8) and the public keys of all
(``HEARTH_SERVICE_PUBLIC_KEYS_FILE``, the *keyset*, JSON)::

    {"keys": [{"component": "gateway", "public_key": "<base64url of the raw 32 bytes>"}, ...]}

A key's id (``kid``) is the first 16 hex digits of SHA-256 of its raw public key, so the
keyset cannot name a key wrongly. The keyset may hold several keys of one component:
that is how one component's key is rotated (docs/deploy.md).

Token (``x-hearth-token``)::

    v3.<kid>.<aud>.<exp>.<base64url Ed25519(private, "hearth-service-token|v3|kid|principal|role|aud|exp")>

The receiver finds ``kid`` in the keyset (``unknown_signing_key``), checks the signature
(``bad_token_signature``), the audience (``wrong_audience``, as with the HMAC tokens of
``identity.ServiceTokenSigner``) and then **who may vouch for whom** (``may_vouch``,
``signer_may_not_vouch``):

* ``svc:<name>`` — only ``<name>``'s own key, and only in the ``service`` role: the
  gateway cannot act as ``svc:privacy``, nor a compromised data holder as
  ``svc:clustering`` in the ``admin`` role (which would let it export any household,
  request deletions or read the audit log at the privacy service).
* any other principal (a person or an API-key client, authenticated at the edge) — the
  gateway's key (it forwards the HTTP caller's principal, and the edge authorizer's
  tokens are the gateway's), and the privacy service's key towards the data holders
  (clustering, attribution, feedback) only: an export job forwards the privacy officer's
  (or admin's) principal to each ``DataHolder/ExportAccount`` so that the permission
  matrix judges the human (``services/privacy/deletion/app.py``, ``on_behalf_of_caller``).
  It is the only place a service forwards a caller's principal (every other peer call is
  ``Peer.call`` acting as ``svc:<calling service>``). So a compromised privacy service
  could act as a person towards the data holders — it can already erase them all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.common import strict_json

COMPONENTS = ("gateway", "clustering", "attribution", "privacy", "feedback")
DATA_HOLDERS = ("clustering", "attribution", "feedback")
# The component of a process's own random key when no keys are configured: it may vouch
# for anyone, and only that process trusts it (identity's "random key of its own").
ANY_COMPONENT = "*"
SIGNING_KEY_ENV = "HEARTH_SERVICE_SIGNING_KEY_FILE"
PUBLIC_KEYS_ENV = "HEARTH_SERVICE_PUBLIC_KEYS_FILE"
_VERSION = "v3"
_KID = re.compile(r"^[0-9a-f]{16}$")
_AUDIENCE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MAX_TOKEN_CHARS = 256


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def may_vouch(signer: str, principal_id: str, audience: str, role: str) -> bool:
    """Whether a token signed by component ``signer`` may carry ``principal_id`` in
    ``role`` to ``audience`` (the rules in the module docstring)."""
    if signer == ANY_COMPONENT:
        return True
    if principal_id.lower().startswith("svc:"):
        # A component's own principal is a service's: with its key alone it must not
        # raise its role (until review19 svc:clustering signed as admin was accepted).
        return principal_id == f"svc:{signer}" and role == "service"
    return signer == "gateway" or (signer == "privacy" and audience in DATA_HOLDERS)


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str
    component: str
    key: Ed25519PublicKey


class KeyError_(ValueError):
    """A key file or keyset that cannot be used (the message names the file)."""


def load_keyset(path: str | Path) -> dict[str, PublicKey]:
    """The keyset file as ``{kid: PublicKey}``; KeyError_ naming the problem. An entry's
    ``kid`` is optional (computed from the key; when given, it must match)."""
    try:
        document = strict_json.loads(Path(path).read_text())
        entries = document["keys"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("'keys' must be a non-empty list")
        keyset: dict[str, PublicKey] = {}
        for entry in entries:
            component = entry["component"]
            if component not in COMPONENTS:
                raise ValueError(f"unknown component {component!r} (one of {', '.join(COMPONENTS)})")
            key = Ed25519PublicKey.from_public_bytes(_unb64(entry["public_key"]))
            kid = key_id(key)
            if entry.get("kid", kid) != kid:
                raise ValueError(f"kid {entry['kid']!r} is not the id of its key ({kid})")
            if kid in keyset and keyset[kid].component != component:
                raise ValueError(f"one key listed for two components ({keyset[kid].component}, {component})")
            keyset[kid] = PublicKey(kid, component, key)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyError_(f"{path}: not a usable public keyset: {exc}") from None
    return keyset


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyError_(f"{path}: not a readable PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path}: not an Ed25519 private key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def keyset_entry(component: str, key: Ed25519PrivateKey | Ed25519PublicKey) -> dict[str, str]:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return {"component": component, "public_key": _b64(_raw_public(public)), "kid": key_id(public)}


def generate(directory: Path, components: tuple[str, ...] = COMPONENTS) -> dict[str, Path]:
    """Write ``<component>.pem`` (mode 0600) per component and ``public-keys.json`` into
    ``directory``, keeping any key file already there (so a data dir's keys survive
    restarts). Returns ``{component: private key path, "keyset": path}``.

    The keyset never loses a key: it lists every component's key in the folder (not only
    the ones asked for now) and keeps every entry it already listed (an earlier key kept
    during a rotation, a key added by hand). Until session 21 ``generate DIR privacy`` on a
    folder holding all five keys rewrote the keyset with privacy's entry alone, and a
    ConfigMap built from it would have locked the other four components out."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)   # private keys: the owner's only
    keyset = directory / "public-keys.json"
    paths: dict[str, Path] = {}
    entries = []
    for component in COMPONENTS:
        path = directory / f"{component}.pem"
        if path.exists():
            key = load_private_key(path)
        elif component in components:
            key = Ed25519PrivateKey.generate()
            path.touch(mode=0o600)
            path.write_bytes(private_pem(key))
        else:
            continue
        if component in components:
            paths[component] = path
        entries.append(keyset_entry(component, key))
    if keyset.exists():   # a listed key that is not one of the folder's stays listed
        listed = {entry["kid"] for entry in entries}
        entries += [keyset_entry(key.component, key.key) for kid, key in load_keyset(keyset).items()
                    if kid not in listed]
    text = json.dumps({"keys": entries}, indent=2) + "\n"
    if not keyset.exists() or keyset.read_text() != text:
        partial = directory / "public-keys.json.tmp"
        partial.write_text(text)
        partial.replace(keyset)   # atomic: a process starting meanwhile reads the old or the new
    paths["keyset"] = keyset
    return paths


class ComponentTokenSigner:
    """Signs with one component's private key; verifies with the keyset and ``may_vouch``.
    The same interface as ``identity.ServiceTokenSigner`` (sign / verify), the same
    caches: tokens per (principal, role, audience), verified tokens with what they were
    verified for (one Ed25519 verification per token, not per call)."""

    def __init__(self, private_key: Ed25519PrivateKey, keyset: Mapping[str, PublicKey], ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        if not ttl_s > 0:
            raise ValueError("ttl_s: must be > 0")
        self._private = private_key
        self.kid = key_id(private_key.public_key())
        self._keyset = dict(keyset)
        if self.kid not in self._keyset:
            raise KeyError_(f"{SIGNING_KEY_ENV}: its public key (kid {self.kid}) is not in {PUBLIC_KEYS_ENV}; "
                            "nobody would accept this process's calls")
        self.component = self._keyset[self.kid].component
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._cache: dict[tuple[str, str, str], tuple[int, str]] = {}
        self._verified: dict[str, tuple[str, str, str, str, int]] = {}

    @classmethod
    def ephemeral(cls, ttl_s: float, clock: Callable[[], float] = time.time) -> "ComponentTokenSigner":
        """A random key of this process's own, trusted for every component by this
        process only: in-process calls work, every other process refuses them."""
        key = Ed25519PrivateKey.generate()
        kid = key_id(key.public_key())
        return cls(key, {kid: PublicKey(kid, ANY_COMPONENT, key.public_key())}, ttl_s, clock)

    def _message(self, kid: str, principal_id: str, role: str, audience: str, exp: int) -> bytes:
        return f"hearth-service-token|{_VERSION}|{kid}|{principal_id}|{role}|{audience}|{exp}".encode()

    def _token(self, principal_id: str, role: str, audience: str, exp: int) -> str:
        signature = self._private.sign(self._message(self.kid, principal_id, role, audience, exp))
        return f"{_VERSION}.{self.kid}.{audience}.{exp}.{_b64(signature)}"

    def sign(self, principal, exp: int | None = None, *, audience: str) -> str:
        if not _AUDIENCE.match(audience or ""):
            raise ValueError(f"audience: a component name (lower-case letters), not {audience!r}")
        if exp is not None:
            return self._token(principal.id, principal.role.value, audience, exp)
        from services.common.identity import reusable_token   # identity imports this module

        now = self._clock()
        cache_key = (principal.id, principal.role.value, audience)
        cached = self._cache.get(cache_key)
        if cached is not None and reusable_token(cached[0], now, self.ttl_s):
            return cached[1]
        exp = int(now + self.ttl_s)
        token = self._token(principal.id, principal.role.value, audience, exp)
        if len(self._cache) > 10_000:  # bounded: principals are many only under attack
            self._cache.clear()
        self._cache[cache_key] = (exp, token)
        return token

    def verify(self, principal_id: str, role: str, token: str, *, audience: str) -> str:
        from services.common.identity import _unauthenticated, check_audience_and_lifetime

        known = self._verified.get(token) if isinstance(token, str) else None
        if known is not None and known[0] == principal_id and known[1] == role:
            signer, token_audience, exp = known[2], known[3], known[4]
        else:
            parts = token.split(".") if isinstance(token, str) and len(token) <= _MAX_TOKEN_CHARS else []
            if (len(parts) != 5 or parts[0] != _VERSION or not _KID.match(parts[1]) or not _AUDIENCE.match(parts[2])
                    or not parts[3].isdigit() or len(parts[3]) > 12):
                raise _unauthenticated("malformed_token")
            kid, token_audience, exp = parts[1], parts[2], int(parts[3])
            public = self._keyset.get(kid)
            if public is None:
                raise _unauthenticated("unknown_signing_key")
            try:
                signature = _unb64(parts[4])
                if _b64(signature) != parts[4]:   # one encoding per signature: no malleable variants
                    raise ValueError
                public.key.verify(signature, self._message(kid, principal_id, role, token_audience, exp))
            except (InvalidSignature, ValueError):
                raise _unauthenticated("bad_token_signature") from None
            signer = public.component
            if len(self._verified) > 10_000:  # bounded: a few tokens per peer are live at once
                self._verified.clear()
            self._verified[token] = (principal_id, role, signer, token_audience, exp)
        if token_audience == audience and not may_vouch(signer, principal_id, audience, role):
            # e.g. svc:privacy signed with the gateway's key: a compromised gateway.
            raise _unauthenticated("signer_may_not_vouch")
        check_audience_and_lifetime(token_audience, audience, exp, self._clock(), self.ttl_s)
        return signer   # the component whose key signed (identity binds it to a TLS peer's)


def main(argv: list[str] | None = None) -> int:
    """``python -m services.common.service_keys generate DIR [component ...]``: a private
    key per component (kept if present) and the keyset of their public keys."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services.common.service_keys",
                                     description="Generate per-component service-token signing keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write <component>.pem for each and public-keys.json")
    gen.add_argument("directory", type=Path)
    gen.add_argument("components", nargs="*", help=f"default: all of {', '.join(COMPONENTS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.components) - set(COMPONENTS))
    if unknown:
        parser.error(f"unknown component(s) {', '.join(unknown)} (one of {', '.join(COMPONENTS)})")
    paths = generate(args.directory, tuple(args.components) or COMPONENTS)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
