"""Ed25519 signing keys for signed tree heads and deletion receipts.

Keys come from configuration in one of two forms, detected automatically:

* **PEM** — ``-----BEGIN PRIVATE KEY-----`` (PKCS#8, unencrypted) for a private key,
  ``-----BEGIN PUBLIC KEY-----`` (SubjectPublicKeyInfo) for a public key;
* **raw base64** — standard or URL-safe base64 of the 32 raw key bytes (for a private
  key, the 32-byte seed).

A key is named by its **key id**: the first 16 hex digits of SHA-256 over the 32 raw
public key bytes. Signed objects carry the key id so that a verifier holding several
keys (for example across a rotation) picks the right one, and so that a receipt
signed by another key fails with a clear message rather than a bare "bad signature".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "private_key_to_pem",
    "public_key_raw_b64",
    "public_key_to_pem",
    "verify_signature",
]

KEY_ID_HEX_DIGITS = 16
_RAW_KEY_BYTES = 32


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh random Ed25519 private key (for tests, tooling and first start)."""
    return Ed25519PrivateKey.generate()


def _as_text(config: str | bytes, argument: str) -> str:
    if isinstance(config, bytes):
        try:
            return config.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{argument}: key material must be ASCII (PEM or base64)") from exc
    if not isinstance(config, str):
        raise ValueError(f"{argument}: expected str or bytes, got {type(config).__name__}")
    return config


def _decode_raw_b64(text: str, argument: str) -> bytes:
    compact = "".join(text.split())
    padded = compact + "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            raw = base64.urlsafe_b64decode(padded)
        else:
            raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{argument}: neither PEM nor valid base64") from exc
    if len(raw) != _RAW_KEY_BYTES:
        raise ValueError(
            f"{argument}: raw Ed25519 key must be {_RAW_KEY_BYTES} bytes, got {len(raw)}"
        )
    return raw


def load_private_key(config: str | bytes, *, argument: str = "private_key") -> Ed25519PrivateKey:
    """Ed25519 private key from PEM (PKCS#8, unencrypted) or base64 of the 32-byte seed."""
    text = _as_text(config, argument).strip()
    if not text:
        raise ValueError(f"{argument}: empty key configuration")
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{argument}: unreadable PEM private key ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{argument}: PEM key is {type(key).__name__}, expected Ed25519")
        return key
    return Ed25519PrivateKey.from_private_bytes(_decode_raw_b64(text, argument))


def load_public_key(config: str | bytes, *, argument: str = "public_key") -> Ed25519PublicKey:
    """Ed25519 public key from PEM (SubjectPublicKeyInfo) or base64 of the 32 raw bytes.

    A PEM *private* key is accepted too (its public half is returned), which lets a
    single configuration value serve both the signer and a local verifier.
    """
    text = _as_text(config, argument).strip()
    if not text:
        raise ValueError(f"{argument}: empty key configuration")
    if text.startswith("-----BEGIN") and "PRIVATE" in text.split("\n", 1)[0]:
        return load_private_key(text, argument=argument).public_key()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{argument}: unreadable PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{argument}: PEM key is {type(key).__name__}, expected Ed25519")
        return key
    return Ed25519PublicKey.from_public_bytes(_decode_raw_b64(text, argument))


def load_public_keys(config: str | bytes, *, argument: str = "public_keys") -> list[Ed25519PublicKey]:
    """Several Ed25519 public keys: PEM blocks one after the other and/or base64 raw keys
    separated by commas or white space ("" -> none). ValueError naming ``argument`` and
    the key's position when one is unusable."""
    import re

    text = _as_text(config, argument)
    pems = re.findall(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", text, flags=re.S)
    rest = re.sub(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", " ", text, flags=re.S)
    items = pems + [item for item in re.split(r"[,\s]+", rest) if item]
    return [load_public_key(item, argument=f"{argument}[{i}]") for i, item in enumerate(items)]


def _public_raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of SHA-256(raw public key bytes); the same for both halves."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"key: expected an Ed25519 key, got {type(key).__name__}")
    return hashlib.sha256(_public_raw(key)).hexdigest()[:KEY_ID_HEX_DIGITS]


def public_key_to_pem(public_key: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM text of a public key (what operators hand to verifiers)."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def public_key_raw_b64(public_key: Ed25519PublicKey) -> str:
    """Standard base64 of the 32 raw public key bytes."""
    return base64.b64encode(_public_raw(public_key)).decode("ascii")


def publish_public_key(path: Path, public_key: Ed25519PublicKey) -> None:
    """Write ``public_key`` (PEM) to ``path`` for the offline verifiers; a different key
    already published there is first kept beside it as ``<name>.<its key id>.pub``: it is
    what verifies everything signed before (attack25: a start with a new key wrote over
    it, and in development that file was its only copy)."""
    pem = public_key_to_pem(public_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        earlier = path.read_text()
        if earlier == pem:
            return
        try:
            name = key_id(load_public_key(earlier, argument=str(path)))
        except ValueError:
            name = "unreadable-" + hashlib.sha256(earlier.encode()).hexdigest()[:KEY_ID_HEX_DIGITS]
        kept = path.with_name(f"{path.stem}.{name}{path.suffix}")
        if not kept.exists():
            path.replace(kept)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(pem)
    partial.replace(path)


def private_key_to_pem(private_key: Ed25519PrivateKey) -> str:
    """Unencrypted PKCS#8 PEM text of a private key (for configuration files and tests)."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message``; never raises
    for a wrong signature (a malformed one, e.g. of the wrong length, is just invalid)."""
    try:
        public_key.verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
