"""Signed deletion receipts that anyone holding the public key can verify offline.

A receipt states what a deletion job removed and on whose behalf:

    {"v": 1, "type": "hearth-deletion-receipt",
     "receipt_id": ..., "job_id": ..., "account_id": ...,
     "scope": {"kind": "device"|"person"|"household"|"window", ...},
     "requested_by": {"principal": ..., "role": ...},
     "requested_at": ts, "completed_at": ts,
     "services": {"clustering": {"count": 12, "ids_digest": hex, "purges": [...]}, ...},
     "total_count": 12, "key_id": ...}

``purges`` (present when the service reported any) lists what made the erasure physical
in that service's store, and when: ``{"store": "sqlite"|"postgres", "where": file or
schema and tables, "action": e.g. "secure_delete; wal_checkpoint(TRUNCATE)", "at": ts,
"complete": bool}`` (docs/privacy.md §11, "What erased means").

``ids_digest`` = hex SHA-256 of the sorted deleted record ids joined by ``"\\n"``
(code-point order, which equals UTF-8 byte order) — the definition every service's
Erase uses (``services/common/erasure.py``), so the digests they return go into the
receipt unchanged. Ids cannot contain a newline, so the join is unambiguous. A service
that deleted nothing reports count 0 and SHA-256 of the empty string. Keeping digests rather
than ids means the receipt itself holds no personal data, while a service that kept
its id list can prove which records a receipt covers.

The signature is Ed25519 over the canonical JSON of that object (sorted keys, no
whitespace, UTF-8). The file form is ``{"receipt": {...}, "signature": base64,
"alg": "Ed25519", "public_key": base64}``; the embedded public key is a convenience
only — authenticity comes from checking against a key obtained out of band.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.common.strict_json import DuplicateKeyError, loads_unambiguous
from services.privacy.audit.domain import canonical_json, format_ts, parse_ts
from services.privacy.keys.signing import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    key_id,
    load_public_key,
    public_key_raw_b64,
    verify_signature,
)

RECEIPT_VERSION = 1
RECEIPT_TYPE = "hearth-deletion-receipt"
SIGNATURE_ALG = "Ed25519"
SCOPE_KINDS = ("device", "person", "household", "window")


class ReceiptVerificationError(Exception):
    """The receipt is well-formed but not authentic (forged, altered or another key)."""


def ids_digest(ids: Iterable[str]) -> str:
    """Hex SHA-256 of ``"\\n".join(sorted(ids))`` (UTF-8); ids must not contain a newline."""
    if isinstance(ids, (str, bytes)):
        raise ValueError("ids: expected an iterable of ids, not a single string")
    checked = []
    for i, record_id in enumerate(ids):
        if not isinstance(record_id, str):
            raise ValueError(f"ids[{i}]: expected a string, got {type(record_id).__name__}")
        if "\n" in record_id:
            raise ValueError(f"ids[{i}]: must not contain a newline")
        checked.append(record_id)
    return hashlib.sha256("\n".join(sorted(checked)).encode("utf-8")).hexdigest()


EMPTY_IDS_DIGEST = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True, slots=True)
class ServiceDeletion:
    """What one service deleted: a count, the digest of the deleted ids, and the steps
    that made the deletion physical (``purges``, see the module docstring)."""

    count: int
    ids_digest: str
    purges: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "purges", tuple(_check_purge(p, i) for i, p in enumerate(self.purges)))
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"count: expected an int >= 0, got {self.count!r}")
        if (
            not isinstance(self.ids_digest, str)
            or len(self.ids_digest) != 64
            or any(c not in "0123456789abcdef" for c in self.ids_digest)
        ):
            raise ValueError(f"ids_digest: expected 64 lowercase hex digits, got {self.ids_digest!r}")
        if self.count == 0 and self.ids_digest != EMPTY_IDS_DIGEST:
            raise ValueError("ids_digest: a count of 0 must carry the digest of no ids")


_PURGE_FIELDS = {"store": str, "where": str, "action": str, "at": str, "complete": bool}


def _check_purge(purge: Any, index: int) -> dict[str, Any]:
    if not isinstance(purge, Mapping) or set(purge) != set(_PURGE_FIELDS):
        raise ValueError(f"purges[{index}]: expected {{{', '.join(_PURGE_FIELDS)}}}")
    for name, kind in _PURGE_FIELDS.items():
        if not isinstance(purge[name], kind):
            raise ValueError(f"purges[{index}].{name}: expected {kind.__name__}")
    parse_ts(purge["at"], f"purges[{index}].at")
    return dict(purge)


@dataclass(frozen=True, slots=True)
class DeletionReceipt:
    """Unsigned receipt contents; ``scope`` is the JSON form of an ``ErasureScope`` (services/common/erasure.py)."""

    receipt_id: str
    job_id: str
    account_id: str
    scope: Mapping[str, Any]
    principal: str
    role: str
    requested_at: datetime
    completed_at: datetime
    services: Mapping[str, ServiceDeletion]
    key_id: str

    def __post_init__(self) -> None:
        for name in ("receipt_id", "job_id", "account_id", "principal", "role", "key_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if not isinstance(self.scope, Mapping) or self.scope.get("kind") not in SCOPE_KINDS:
            raise ValueError(f"scope.kind: expected one of {', '.join(SCOPE_KINDS)}")
        if self.scope.get("account_id") != self.account_id:
            raise ValueError("scope.account_id: must equal the receipt's account_id")
        object.__setattr__(self, "requested_at", parse_ts(self.requested_at, "requested_at"))
        object.__setattr__(self, "completed_at", parse_ts(self.completed_at, "completed_at"))
        if self.completed_at < self.requested_at:
            raise ValueError("completed_at: earlier than requested_at")
        if not isinstance(self.services, Mapping) or not self.services:
            raise ValueError("services: at least one service result is required")
        for name, result in self.services.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"services: invalid service name {name!r}")
            if not isinstance(result, ServiceDeletion):
                raise ValueError(f"services.{name}: expected ServiceDeletion")

    @property
    def total_count(self) -> int:
        return sum(r.count for r in self.services.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": RECEIPT_VERSION,
            "type": RECEIPT_TYPE,
            "receipt_id": self.receipt_id,
            "job_id": self.job_id,
            "account_id": self.account_id,
            "scope": dict(self.scope),
            "requested_by": {"principal": self.principal, "role": self.role},
            "requested_at": format_ts(self.requested_at, "requested_at"),
            "completed_at": format_ts(self.completed_at, "completed_at"),
            "services": {
                name: {"count": r.count, "ids_digest": r.ids_digest,
                       **({"purges": [dict(p) for p in r.purges]} if r.purges else {})}
                for name, r in sorted(self.services.items())
            },
            "total_count": self.total_count,
            "key_id": self.key_id,
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeletionReceipt:
        """Parse and check internal consistency (total_count must equal the sum)."""
        if not isinstance(data, Mapping):
            raise ValueError("receipt: expected an object")
        required = ("v", "type", "receipt_id", "job_id", "account_id", "scope", "requested_by",
                    "requested_at", "completed_at", "services", "total_count", "key_id")
        for name in required:
            if name not in data:
                raise ValueError(f"receipt.{name}: missing")
        extra = set(data) - set(required)
        if extra:
            raise ValueError(f"receipt.{sorted(extra)[0]}: unknown field")
        if data["v"] != RECEIPT_VERSION or data["type"] != RECEIPT_TYPE:
            raise ValueError(f"receipt.type: not a version {RECEIPT_VERSION} deletion receipt")
        by = data["requested_by"]
        if not isinstance(by, Mapping) or "principal" not in by or "role" not in by:
            raise ValueError("receipt.requested_by: expected {principal, role}")
        services_raw = data["services"]
        if not isinstance(services_raw, Mapping):
            raise ValueError("receipt.services: expected an object")
        services = {}
        for name, r in services_raw.items():
            if not isinstance(r, Mapping) or set(r) not in ({"count", "ids_digest"},
                                                            {"count", "ids_digest", "purges"}):
                raise ValueError(f"receipt.services.{name}: expected {{count, ids_digest[, purges]}}")
            if not isinstance(r.get("purges", []), list):
                raise ValueError(f"receipt.services.{name}.purges: expected a list")
            try:
                services[name] = ServiceDeletion(r["count"], r["ids_digest"], tuple(r.get("purges", ())))
            except ValueError as exc:
                raise ValueError(f"receipt.services.{name}.{exc}") from None
        try:
            receipt = cls(
                receipt_id=data["receipt_id"], job_id=data["job_id"],
                account_id=data["account_id"], scope=data["scope"],
                principal=by["principal"], role=by["role"],
                requested_at=data["requested_at"], completed_at=data["completed_at"],
                services=services, key_id=data["key_id"],
            )
        except ValueError as exc:
            raise ValueError(f"receipt.{exc}") from None
        if data["total_count"] != receipt.total_count:
            # Well-formed but internally inconsistent: the receipt was altered (the signed
            # bytes include total_count), so this is a failed verification, not bad input.
            raise ReceiptVerificationError(
                f"total_count {data['total_count']!r} != sum of service counts "
                f"{receipt.total_count}: the receipt was altered"
            )
        return receipt


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    receipt: DeletionReceipt
    signature: bytes
    public_key_b64: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "receipt": self.receipt.to_dict(),
            "alg": SIGNATURE_ALG,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        if self.public_key_b64:
            out["public_key"] = self.public_key_b64
        return out

    def to_json(self) -> str:
        """Canonical JSON text of the file form."""
        return canonical_json(self.to_dict()).decode("utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignedReceipt:
        if not isinstance(data, Mapping):
            raise ValueError("signed receipt: expected an object")
        for name in ("receipt", "signature"):
            if name not in data:
                raise ValueError(f"{name}: missing")
        if data.get("alg", SIGNATURE_ALG) != SIGNATURE_ALG:
            raise ValueError(f"alg: only {SIGNATURE_ALG} is supported, got {data['alg']!r}")
        try:
            signature = base64.b64decode(data["signature"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ValueError("signature: expected base64") from None
        if base64.b64encode(signature).decode("ascii") != data["signature"]:
            # The last character of a 64-byte signature carries 4 bits the decoder ignores:
            # a changed one would still verify. Only the canonical encoding is the signature.
            raise ReceiptVerificationError("signature: not the canonical base64 of its bytes: altered")
        public = data.get("public_key", "")
        if not isinstance(public, str):
            raise ValueError("public_key: expected base64 text")
        receipt = DeletionReceipt.from_dict(data["receipt"])
        # The signature is checked against the receipt's canonical bytes, rebuilt from the
        # parsed fields; parsing is lenient (2.0 == 2, any ISO-8601 form of an instant, extra
        # keys in requested_by), so a receipt whose text differs from what was signed would
        # otherwise still verify. What was received must be exactly what the bytes say.
        try:
            received = canonical_json(data["receipt"])
        except (TypeError, ValueError):
            received = b""
        if received != receipt.canonical_bytes():
            raise ReceiptVerificationError(
                "receipt: its fields are not the signed canonical form (a value was rewritten "
                "or a field added): the receipt was altered")
        return cls(receipt, signature, public)

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedReceipt:
        try:
            data = loads_unambiguous(text)
        except DuplicateKeyError as exc:  # two readings of one receipt: altered
            raise ReceiptVerificationError(f"receipt: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"receipt: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def sign_receipt(receipt: DeletionReceipt, private_key: Ed25519PrivateKey) -> SignedReceipt:
    """Sign with Ed25519; the receipt's ``key_id`` must name this key."""
    if not isinstance(receipt, DeletionReceipt):
        raise ValueError(f"receipt: expected DeletionReceipt, got {type(receipt).__name__}")
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError("private_key: expected an Ed25519 private key")
    if receipt.key_id != key_id(private_key):
        raise ValueError(f"receipt.key_id: {receipt.key_id!r} does not name the signing key")
    signature = private_key.sign(receipt.canonical_bytes())
    return SignedReceipt(receipt, signature, public_key_raw_b64(private_key.public_key()))


def verify_receipt(
    signed: SignedReceipt, public_key: Ed25519PublicKey | None = None
) -> DeletionReceipt:
    """Return the receipt if authentic, else raise ``ReceiptVerificationError``.

    Without ``public_key`` the embedded key is used: that proves integrity only (anyone
    can sign with their own key), so callers must say so to the user.
    """
    if not isinstance(signed, SignedReceipt):
        raise ValueError(f"signed: expected SignedReceipt, got {type(signed).__name__}")
    if public_key is None:
        if not signed.public_key_b64:
            raise ValueError("public_key: none given and none embedded in the receipt")
        public_key = load_public_key(signed.public_key_b64, argument="receipt.public_key")
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("public_key: expected an Ed25519 public key")
    expected_id = key_id(public_key)
    if signed.receipt.key_id != expected_id:
        raise ReceiptVerificationError(
            f"receipt was signed by key {signed.receipt.key_id}, not by {expected_id}"
        )
    if not verify_signature(public_key, signed.signature, signed.receipt.canonical_bytes()):
        raise ReceiptVerificationError("signature does not match the receipt contents")
    return signed.receipt
