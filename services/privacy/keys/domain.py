"""Envelope encryption of sensitive fields, KEK rotation and crypto-shredding.

Keys
    * **KEK** (key-encryption key): 256-bit AES keys from configuration, each with an
      id (``kek_id``, e.g. ``"kek-2025-01"``); exactly one is *active* for wrapping.
    * **DEK** (data-encryption key): a random 256-bit AES key per household
      (``account_id``) and version. Only its *wrapped* form leaves this module, in a
      ``WrappedDek`` record that the service persists.

Formats (all integers big-endian)
    * wrapped DEK  = ``nonce(12) || AES-256-GCM_KEK(dek, aad)``
      with ``aad = b"hearth-dek-v1" 0x00 json([account_id, dek_version, kek_id])``.
      GCM (rather than AES-KW) lets the wrap bind the DEK to its household, so a
      wrapped key copied onto another account's record fails to unwrap.
    * field blob   = ``0x01 || dek_version(4) || nonce(12) || AES-256-GCM_DEK(pt, aad)``
      with ``aad = b"hearth-field-v1" 0x00 json([account_id, field, dek_version])``.
      The AAD binds a ciphertext to (household, field): moving it to another
      household or column makes decryption fail.

Nonces are 96-bit random (``os.urandom``); with at most ~2^32 encryptions per DEK
the collision risk stays below NIST's 2^-32 bound.

Lifecycle
    * **KEK rotation**: make the new KEK active, then ``rewrap_all()`` returns every
      DEK record wrapped under it; data blobs are untouched (no re-encryption). The old
      KEK can be retired once those records are stored.
    * **Crypto-shredding**: ``destroy_dek(account_id)`` forgets every DEK version of
      the household and returns tombstone records (no key material). Any later decrypt
      raises ``KeyDestroyedError``; ciphertexts left in backups become unreadable.
      A data key rotation (``keys/rotation.py``) destroys older versions one by one in the
      store, version 1 included (since session 27).
    * **Digest key**: the HMAC key of the household's erased-id digests
      (``services.common.field_crypto.FieldCipher.digests``), a record of version
      ``DIGEST_KEY_VERSION`` (0) beside the DEK versions: ``HMAC-SHA256(DEK v1,
      "hearth-erased-id-v1")``, derived once (``derive_digest_key``) while version 1 lives,
      so the digests keep matching after version 1 is destroyed, and it opens no data
      (one-way from version 1; no field blob names version 0, ``_cipher`` refuses it).
      Wrapped like a DEK (its own AAD: version 0), re-wrapped by a KEK rotation, carried
      over by DEK rotations unchanged and shredded with the household (``destroy_dek``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from json.encoder import encode_basestring_ascii as _json_string

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.privacy.audit.domain import parse_ts

KEY_BYTES = 32
DIGEST_KEY_VERSION = 0          # the record of a household's erased-id digest key
FIRST_DEK_VERSION = 1           # the data key the digest key is derived from
DIGEST_LABEL = b"hearth-erased-id-v1"   # as services.common.field_crypto's
NONCE_BYTES = 12
BLOB_VERSION = 1
_BLOB_HEADER = 1 + 4 + NONCE_BYTES
_TAG_BYTES = 16


class KeyUnavailableError(Exception):
    """No usable DEK for this household."""


class KeyNotFoundError(KeyUnavailableError):
    """The household has no DEK (or not the version the ciphertext names)."""


class KeyDestroyedError(KeyUnavailableError):
    """The household's DEK was crypto-shredded; its ciphertexts are unreadable for good."""


class DecryptionError(Exception):
    """Authentication failed: wrong household/field (AAD), altered bytes or wrong key."""


@dataclass(frozen=True, slots=True)
class KeyEncryptionKey:
    kek_id: str
    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kek_id, str) or not self.kek_id or "=" in self.kek_id \
                or "," in self.kek_id:
            raise ValueError(f"kek_id: expected a non-empty id without '=' or ',', got {self.kek_id!r}")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"kek[{self.kek_id}].key: expected {KEY_BYTES} bytes")

    def __repr__(self) -> str:  # never print key material
        return f"KeyEncryptionKey(kek_id={self.kek_id!r}, key=<redacted>)"


def parse_kek_config(text: str) -> list[KeyEncryptionKey]:
    """KEKs from ``"id1=<base64 32 bytes>,id2=<base64>"`` (whitespace ignored)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("keks: empty KEK configuration")
    keks: list[KeyEncryptionKey] = []
    seen: set[str] = set()
    for i, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"keks[{i}]: expected id=base64key")
        kek_id, b64 = part.split("=", 1)
        kek_id = kek_id.strip()
        b64 = b64.strip()
        try:
            key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"keks[{kek_id}]: key is not valid base64") from None
        if kek_id in seen:
            raise ValueError(f"keks[{kek_id}]: duplicate KEK id")
        seen.add(kek_id)
        keks.append(KeyEncryptionKey(kek_id, key))
    return keks


def generate_kek(kek_id: str) -> KeyEncryptionKey:
    return KeyEncryptionKey(kek_id, AESGCM.generate_key(bit_length=256))


@dataclass(frozen=True, slots=True)
class WrappedDek:
    """Persisted DEK record. ``wrapped`` is empty and ``destroyed_at`` set for a tombstone.

    Primary key: (account_id, dek_version). The service stores these rows verbatim.
    """

    account_id: str
    dek_version: int
    kek_id: str
    wrapped: bytes
    created_at: datetime
    destroyed_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.account_id, str) or not self.account_id:
            raise ValueError("account_id: expected a non-empty string")
        v = self.dek_version
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
            raise ValueError(f"dek_version: expected an int in [0, 2^32) (0: the digest key), got {v!r}")
        if not isinstance(self.kek_id, str):
            raise ValueError("kek_id: expected a string")
        if not isinstance(self.wrapped, bytes):
            raise ValueError("wrapped: expected bytes")
        object.__setattr__(self, "created_at", parse_ts(self.created_at, "created_at"))
        if self.destroyed_at is not None:
            object.__setattr__(self, "destroyed_at", parse_ts(self.destroyed_at, "destroyed_at"))
            if self.wrapped:
                raise ValueError("wrapped: a destroyed DEK record must not keep key material")
        elif len(self.wrapped) != NONCE_BYTES + KEY_BYTES + _TAG_BYTES:
            raise ValueError(
                f"wrapped: expected {NONCE_BYTES + KEY_BYTES + _TAG_BYTES} bytes, "
                f"got {len(self.wrapped)}"
            )

    @property
    def destroyed(self) -> bool:
        return self.destroyed_at is not None

    @property
    def is_digest_key(self) -> bool:
        return self.dek_version == DIGEST_KEY_VERSION


def _created(record: WrappedDek) -> datetime:
    return record.created_at


def _aad(label: bytes, *parts: object) -> bytes:
    # JSON of a list is unambiguous for any strings, unlike plain concatenation. For str and
    # int parts (every call here) written directly, as json.dumps writes them (ensure_ascii,
    # an int's repr): json.dumps built an encoder a call, ~40 % of a new household's key
    # creation in GetDataKeys (session 28; tests/unit/privacy/test_crypto.py holds the two equal).
    if all(type(p) is str or type(p) is int for p in parts):
        return label + b"\x00[" + ",".join(
            _json_string(p) if type(p) is str else repr(p) for p in parts).encode("ascii") + b"]"
    return label + b"\x00" + json.dumps(list(parts), separators=(",", ":")).encode("utf-8")


def _check_name(value: object, argument: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{argument}: expected a non-empty string, got {value!r}")
    return value


class KeyRing:
    """Holds KEKs and this process's view of the DEK records; gives records out to store.

    Methods that create or change key state return the ``WrappedDek`` records the
    caller must persist (idempotent upserts keyed by (account_id, dek_version)).
    Unwrapped DEKs are cached in memory after first use.
    """

    def __init__(
        self,
        keks: Iterable[KeyEncryptionKey],
        active_kek_id: str,
        records: Iterable[WrappedDek] = (),
    ) -> None:
        self._keks: dict[str, KeyEncryptionKey] = {}
        for k in keks:
            if not isinstance(k, KeyEncryptionKey):
                raise ValueError("keks: expected KeyEncryptionKey items")
            if k.kek_id in self._keks:
                raise ValueError(f"keks[{k.kek_id}]: duplicate KEK id")
            self._keks[k.kek_id] = k
        if active_kek_id not in self._keks:
            raise ValueError(f"active_kek_id: {active_kek_id!r} is not among the configured KEKs")
        self._active = active_kek_id
        self._records: dict[str, dict[int, WrappedDek]] = {}
        self._cache: dict[tuple[str, int], AESGCM] = {}
        self.load(records)

    # -- records ---------------------------------------------------------------------

    def load(self, records: Iterable[WrappedDek]) -> None:
        """Add stored records; a tombstone wins over live key material for its version."""
        for i, r in enumerate(records):
            if not isinstance(r, WrappedDek):
                raise ValueError(f"records[{i}]: expected WrappedDek")
            if not r.destroyed and r.kek_id not in self._keks:
                raise ValueError(f"records[{i}].kek_id: unknown KEK {r.kek_id!r}")
            versions = self._records.setdefault(r.account_id, {})
            current = versions.get(r.dek_version)
            if current is not None and current.destroyed:
                continue
            versions[r.dek_version] = r
            if r.destroyed or (current is not None and current != r):
                # A replaced record (tombstone, re-wrap, or another replica's key that won
                # a creation race) invalidates the key cached for that version.
                self._cache.pop((r.account_id, r.dek_version), None)

    def records(self, account_id: str | None = None) -> list[WrappedDek]:
        """All records (or one household's), ordered by (account_id, version)."""
        accounts = [account_id] if account_id is not None else sorted(self._records)
        return [
            r for a in accounts for _, r in sorted(self._records.get(a, {}).items())
        ]

    @property
    def active_kek_id(self) -> str:
        return self._active

    # -- DEK lifecycle -----------------------------------------------------------------

    def _wrap(self, account_id: str, version: int, dek: bytes, kek_id: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        aad = _aad(b"hearth-dek-v1", account_id, version, kek_id)
        return nonce + AESGCM(self._keks[kek_id].key).encrypt(nonce, dek, aad)

    def _unwrap(self, record: WrappedDek) -> bytes:
        kek = self._keks.get(record.kek_id)
        if kek is None:
            raise KeyNotFoundError(
                f"account {record.account_id}: DEK v{record.dek_version} is wrapped by "
                f"KEK {record.kek_id!r}, which is not configured"
            )
        aad = _aad(b"hearth-dek-v1", record.account_id, record.dek_version, record.kek_id)
        nonce, body = record.wrapped[:NONCE_BYTES], record.wrapped[NONCE_BYTES:]
        try:
            return AESGCM(kek.key).decrypt(nonce, body, aad)
        except InvalidTag:
            # No account id: the error interceptor logs this message, and logs are not
            # rewritten when the household is erased (attack25); the trace id finds the call.
            raise DecryptionError(
                f"a wrapped DEK v{record.dek_version} does not authenticate under KEK {record.kek_id!r}"
            ) from None

    def _live_versions(self, account_id: str) -> dict[int, WrappedDek]:
        """The live data key versions (never the digest key: it seals no data)."""
        if self.is_destroyed(account_id):
            raise KeyDestroyedError(f"account {account_id}: data key destroyed (crypto-shredded)")
        versions = self._records.get(account_id, {})
        return {v: r for v, r in versions.items() if not r.destroyed and v != DIGEST_KEY_VERSION}

    def derive_digest_key(self, account_id: str, now: datetime) -> WrappedDek | None:
        """The household's digest key record, derived from its live version 1, to store
        (insert-if-absent); None when it has one already (live or shredded). Deterministic
        in version 1, so two replicas deriving it at once store the same key.
        ``KeyNotFoundError`` when version 1 is gone and there is no digest key (cannot
        happen through ``KeyService``: a rotation derives it before destroying version 1)."""
        _check_name(account_id, "account_id")
        versions = self._records.get(account_id, {})
        if DIGEST_KEY_VERSION in versions:
            return None
        first = self._live_versions(account_id).get(FIRST_DEK_VERSION)
        if first is None:
            raise KeyNotFoundError(f"account {account_id}: no data key version 1 to derive the digest key from")
        key = hmac.new(self._unwrap(first), DIGEST_LABEL, hashlib.sha256).digest()
        record = WrappedDek(account_id, DIGEST_KEY_VERSION, self._active,
                            self._wrap(account_id, DIGEST_KEY_VERSION, key, self._active), parse_ts(now, "now"))
        versions[DIGEST_KEY_VERSION] = record
        return record

    def digest_key(self, account_id: str) -> bytes:
        """The household's erased-id digest key (raw). ``KeyDestroyedError`` once
        shredded; ``KeyNotFoundError`` before ``derive_digest_key``."""
        _check_name(account_id, "account_id")
        self._live_versions(account_id)   # KeyDestroyedError once shredded
        record = self._records.get(account_id, {}).get(DIGEST_KEY_VERSION)
        if record is None or record.destroyed:
            raise KeyNotFoundError(f"account {account_id}: no digest key")
        return self._unwrap(record)

    def create_household_keys(self, account_id: str, now: datetime) -> tuple[WrappedDek, WrappedDek | None, bytes]:
        """A new household's first keys: data key version 1, its digest key (as
        ``derive_digest_key`` derives it, from the raw key at hand rather than unwrapped
        again) and the raw data key (GetDataKeys answers it without an unwrap). Only for a
        household with no data key record (``has_dek`` false, not shredded)."""
        _check_name(account_id, "account_id")
        if self._records.get(account_id, {}).keys() - {DIGEST_KEY_VERSION} or self.is_destroyed(account_id):
            raise ValueError(f"account_id: {account_id!r} has data key records already")
        when = parse_ts(now, "now")
        dek = AESGCM.generate_key(bit_length=256)
        record = WrappedDek(account_id, FIRST_DEK_VERSION, self._active,
                            self._wrap(account_id, FIRST_DEK_VERSION, dek, self._active), when)
        versions = self._records.setdefault(account_id, {})
        versions[FIRST_DEK_VERSION] = record
        digest = None
        if DIGEST_KEY_VERSION not in versions:   # one left by a shred of data keys only: kept
            key = hmac.new(dek, DIGEST_LABEL, hashlib.sha256).digest()
            digest = versions[DIGEST_KEY_VERSION] = WrappedDek(
                account_id, DIGEST_KEY_VERSION, self._active, self._wrap(account_id, DIGEST_KEY_VERSION, key, self._active),
                when)
        return record, digest, dek

    def create_dek(self, account_id: str, now: datetime) -> WrappedDek:
        """A new DEK version for the household (version 1, or latest + 1 to rotate the
        DEK); new encryptions use it, older versions still decrypt. Not allowed after
        the household was shredded."""
        _check_name(account_id, "account_id")
        versions = self._records.get(account_id, {})
        if self.is_destroyed(account_id):
            raise KeyDestroyedError(f"account {account_id}: data key destroyed (crypto-shredded)")
        version = max((v for v in versions if v != DIGEST_KEY_VERSION), default=0) + 1
        dek = AESGCM.generate_key(bit_length=256)
        record = WrappedDek(
            account_id, version, self._active, self._wrap(account_id, version, dek, self._active),
            parse_ts(now, "now"),
        )
        self._records.setdefault(account_id, {})[version] = record
        return record   # no cipher cached: the service never encrypts here (attack27: ~2.5 KB a household)

    def forget(self, account_id: str) -> None:
        """Drop the household's records and cached ciphers from this view (the store keeps
        them; ``KeyService`` reads them again before the next use)."""
        for version in self._records.pop(account_id, {}):
            self._cache.pop((account_id, version), None)

    def keep_only(self, account_ids) -> None:
        """``forget`` every household not in ``account_ids``."""
        for account_id in [a for a in self._records if a not in account_ids]:
            self.forget(account_id)

    def discard(self, account_id: str, version: int) -> None:
        """Forget a record ``create_dek`` made that could not be stored (another replica's
        version won, or the household was shredded meanwhile): never served after."""
        self._records.get(account_id, {}).pop(version, None)
        self._cache.pop((account_id, version), None)

    def has_dek(self, account_id: str) -> bool:
        return any(not r.destroyed and not r.is_digest_key for r in self._records.get(account_id, {}).values())

    def is_destroyed(self, account_id: str) -> bool:
        """Shredded: the household has data key versions and every one is destroyed. Its
        digest key is not asked: a privacy replica of a release before session 27 shreds
        the data keys only (it knows no digest key), and a live digest key left beside
        them must not make the household look alive (a new data key would be made for it);
        the rotation sweep tombstones such a digest key (``DataKeyStore.shred_orphan_digest_keys``)."""
        data = [r for v, r in self._records.get(account_id, {}).items() if v != DIGEST_KEY_VERSION]
        return bool(data) and all(r.destroyed for r in data)

    def destroy_dek(self, account_id: str, now: datetime) -> list[WrappedDek]:
        """Crypto-shred: replace every DEK version of the household by a tombstone.

        Returns the tombstones to persist (they *overwrite* the wrapped keys; the store
        must not keep the old rows, and backups expire on their own schedule).
        Idempotent: shredding an already shredded household returns its tombstones.
        """
        _check_name(account_id, "account_id")
        when = parse_ts(now, "now")
        versions = self._records.get(account_id)
        if not versions:
            raise KeyNotFoundError(f"account {account_id}: no data key to destroy")
        tombstones = []
        for version, r in sorted(versions.items()):
            t = r if r.destroyed else replace(r, wrapped=b"", destroyed_at=when)
            versions[version] = t
            self._cache.pop((account_id, version), None)
            tombstones.append(t)
        return tombstones

    def rotate_kek(self, new_active_kek_id: str) -> list[WrappedDek]:
        """Make another configured KEK active and re-wrap every live DEK under it."""
        if new_active_kek_id not in self._keks:
            raise ValueError(f"new_active_kek_id: {new_active_kek_id!r} is not configured")
        self._active = new_active_kek_id
        return self.rewrap_all()

    def rewrap_all(self) -> list[WrappedDek]:
        """Records (changed ones only) re-wrapped under the active KEK; data untouched."""
        changed = []
        for account_id in sorted(self._records):
            for version, r in sorted(self._records[account_id].items()):
                if r.destroyed or r.kek_id == self._active:
                    continue
                dek = self._unwrap(r)
                new = replace(r, kek_id=self._active,
                              wrapped=self._wrap(account_id, version, dek, self._active))
                self._records[account_id][version] = new
                changed.append(new)
        return changed

    def data_key(self, account_id: str, version: int | None = None) -> tuple[int, bytes]:
        """The raw DEK (newest live version, or ``version``) for a store that encrypts
        fields itself (privacy's GetDataKey). Same errors as ``decrypt_field``."""
        _check_name(account_id, "account_id")
        live = self._live_versions(account_id)
        if not live:
            raise KeyNotFoundError(f"account {account_id}: no data key (call create_dek first)")
        chosen = max(live) if version is None else version
        record = live.get(chosen)
        if record is None:
            raise KeyNotFoundError(f"account {account_id}: no DEK version {chosen}")
        return chosen, self._unwrap(record)

    def unopened_data_keys(self, sample: int = 64) -> dict[str, tuple[int, int]]:
        """Per KEK id wrapping live DEKs: (how many of those tried its configured key does
        not open, how many were tried); only KEKs that failed one are listed. Tried: the
        ``sample`` oldest and ``sample`` newest live DEKs of each KEK (by ``created_at``),
        not all (a full pass cost ~17 µs a key on the loaded 2-core machine, 17 s at start
        for a million households): a KEK whose bytes changed under the same id (a lost
        development key file regenerated, a secret replaced by another) opens none of its
        keys, and keys wrapped under a wrong KEK by a process that ran on it are the
        newest. ``replaced_keks`` says which of these the privacy service refuses to
        start on (``KeyService``)."""
        return {kek_id: (bad, tried) for kek_id, (bad, tried, _) in self._try_data_keys(sample).items() if bad}

    def replaced_keks(self, sample: int = 64) -> list[str]:
        """KEK ids whose configured key does not open most of the ``sample`` oldest live
        DEKs it wraps: its bytes are not the ones that wrapped them (a lost development file
        regenerated, another secret under the same id). The privacy service refuses to
        start on such a KEK rather than answer every existing household with an error and
        wrap new households' keys under it. Not a KEK that opens most of the oldest but
        fails some key (one wrapped by a process that ran on a wrong KEK, or a damaged row):
        refusing that one too left no KEK that could start privacy, so every household
        lost its key service for the few whose key is lost anyway (review25)."""
        return [kek_id for kek_id, (_, _, replaced) in self._try_data_keys(sample).items() if replaced]

    def _try_data_keys(self, sample: int) -> dict[str, tuple[int, int, bool]]:
        """Per KEK id wrapping live DEKs: (tried keys it does not open, keys tried,
        whether it fails more than half of the ``sample`` oldest)."""
        live: dict[str, list[WrappedDek]] = {}
        for versions in self._records.values():
            for r in versions.values():
                if not r.destroyed:
                    live.setdefault(r.kek_id, []).append(r)
        found = {}
        for kek_id, records in sorted(live.items()):
            cipher = AESGCM(self._keks[kek_id].key)

            def opens(r: WrappedDek) -> bool:
                nonce, body = r.wrapped[:NONCE_BYTES], r.wrapped[NONCE_BYTES:]
                try:
                    cipher.decrypt(nonce, body, _aad(b"hearth-dek-v1", r.account_id, r.dek_version, r.kek_id))
                except InvalidTag:
                    return False
                return True

            oldest = heapq.nsmallest(sample, records, key=_created)
            tried = {(r.account_id, r.dek_version): r for r in
                     (*oldest, *heapq.nlargest(sample, records, key=_created))}
            opened = {key: opens(r) for key, r in tried.items()}
            found[kek_id] = (sum(not ok for ok in opened.values()), len(tried),
                             2 * sum(not opened[(r.account_id, r.dek_version)] for r in oldest) > len(oldest))
        return found

    def kek_ids_in_use(self) -> set[str]:
        """KEK ids still wrapping live DEKs (a KEK may be retired when not listed)."""
        return {r.kek_id for vs in self._records.values() for r in vs.values() if not r.destroyed}

    # -- field encryption -------------------------------------------------------------

    def _cipher(self, account_id: str, version: int) -> AESGCM:
        cached = self._cache.get((account_id, version))
        if cached is not None:
            return cached
        live = self._live_versions(account_id)
        record = live.get(version)
        if record is None:
            raise KeyNotFoundError(f"account {account_id}: no DEK version {version}")
        cipher = AESGCM(self._unwrap(record))
        self._cache[(account_id, version)] = cipher
        return cipher

    def encrypt_field(self, account_id: str, field: str, plaintext: bytes) -> bytes:
        """Encrypt under the household's newest DEK; the blob names the DEK version."""
        _check_name(account_id, "account_id")
        _check_name(field, "field")
        if not isinstance(plaintext, (bytes, bytearray)):
            raise ValueError(f"plaintext: expected bytes, got {type(plaintext).__name__}")
        live = self._live_versions(account_id)
        if not live:
            raise KeyNotFoundError(f"account {account_id}: no data key (call create_dek first)")
        version = max(live)
        nonce = os.urandom(NONCE_BYTES)
        body = self._cipher(account_id, version).encrypt(
            nonce, bytes(plaintext), _aad(b"hearth-field-v1", account_id, field, version)
        )
        return bytes([BLOB_VERSION]) + version.to_bytes(4, "big") + nonce + body

    def decrypt_field(self, account_id: str, field: str, blob: bytes) -> bytes:
        """Inverse of ``encrypt_field`` for the same (account_id, field).

        Raises ``KeyDestroyedError`` after shredding, ``KeyNotFoundError`` without a key,
        ``DecryptionError`` when the AAD or bytes do not authenticate.
        """
        _check_name(account_id, "account_id")
        _check_name(field, "field")
        if not isinstance(blob, (bytes, bytearray)) or len(blob) < _BLOB_HEADER + _TAG_BYTES:
            raise ValueError("blob: too short to be an encrypted field")
        if blob[0] != BLOB_VERSION:
            raise ValueError(f"blob: unknown format version {blob[0]}")
        version = int.from_bytes(blob[1:5], "big")
        nonce = bytes(blob[5:_BLOB_HEADER])
        cipher = self._cipher(account_id, version)
        try:
            return cipher.decrypt(
                nonce, bytes(blob[_BLOB_HEADER:]), _aad(b"hearth-field-v1", account_id, field, version)
            )
        except InvalidTag:
            raise DecryptionError(f"field {field!r}: ciphertext does not authenticate") from None


def records_to_dicts(records: Iterable[WrappedDek]) -> list[dict[str, object]]:
    """JSON-ready rows (wrapped key as base64) for stores without a bytes column."""
    out = []
    for r in records:
        out.append({
            "account_id": r.account_id,
            "dek_version": r.dek_version,
            "kek_id": r.kek_id,
            "wrapped": base64.b64encode(r.wrapped).decode("ascii"),
            "created_at": r.created_at.isoformat(),
            "destroyed_at": r.destroyed_at.isoformat() if r.destroyed_at else None,
        })
    return out


def records_from_dicts(rows: Iterable[Mapping[str, object]]) -> list[WrappedDek]:
    """Inverse of ``records_to_dicts``."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(WrappedDek(
                account_id=row["account_id"],  # type: ignore[arg-type]
                dek_version=row["dek_version"],  # type: ignore[arg-type]
                kek_id=row["kek_id"],  # type: ignore[arg-type]
                wrapped=base64.b64decode(str(row["wrapped"])),
                created_at=row["created_at"],  # type: ignore[arg-type]
                destroyed_at=row.get("destroyed_at"),  # type: ignore[arg-type]
            ))
        except KeyError as exc:
            raise ValueError(f"rows[{i}].{exc.args[0]}: missing") from None
        except ValueError as exc:
            raise ValueError(f"rows[{i}].{exc}") from None
    return out
